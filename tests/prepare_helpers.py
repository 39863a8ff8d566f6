"""Shared fixtures for the preprocessing tests: tiny checkpoints and synthetic plates, built once per session."""
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("cv2")

from renderer.prepare.synthetic import draw_figure, export_tiny_checkpoints, stick_figure_plate  # noqa: E402

PLATE_FRAMES, PLATE_FPS, PLATE_SIZE = 12, 24.0, (160, 96)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    pytest.importorskip("onnx")
    pytest.importorskip("sam2")
    return export_tiny_checkpoints(tmp_path_factory.mktemp("process_checkpoint"))


@pytest.fixture(scope="session")
def plate(tmp_path_factory) -> Path:
    return stick_figure_plate(tmp_path_factory.mktemp("plate") / "plate.mp4", PLATE_FRAMES, PLATE_FPS, PLATE_SIZE,
                              audio_hz=440.0)


@pytest.fixture(scope="session")
def character(tmp_path_factory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("ref") / "character.png"
    Image.fromarray(draw_figure(96, 160, (48, 80), 120)).save(path)  # portrait sheet: output is portrait too
    return path
