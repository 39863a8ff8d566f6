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
    from renderer.prepare.errors import PrepareError
    from renderer.prepare.mask import _import_sam2

    try:
        _import_sam2()  # never a bare `import sam2`: it leaves a global Hydra behind that breaks our compose
    except PrepareError as e:
        pytest.skip(str(e))
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
