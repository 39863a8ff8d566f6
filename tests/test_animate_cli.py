"""`wanrender generate model=tiny_animate mode=animate|replace ...` on CPU: files written and read back, the
sidecar's record, and bad input refused with exit 2 and one line per problem before any model loads."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from renderer.families.animate.generate import letterbox, parse_loras
from renderer.video_io import read_video, write_mp4

ROOT = Path(__file__).resolve().parents[1]
H, W, FRAMES = 48, 64, 13  # 13 frames, clips of 9 with refert 1 -> padded to 17, 2 clips


def _inputs(tmp: Path, mode: str) -> list[str]:
    rng = np.random.default_rng(0)
    vid = lambda n, h, w: rng.integers(0, 255, (n, h, w, 3), dtype=np.uint8)  # noqa: E731
    Image.fromarray(rng.integers(0, 255, (60, 40, 3), dtype=np.uint8)).save(tmp / "ref.png")  # portrait: letterboxed
    write_mp4(vid(FRAMES, H, W), tmp / "pose.mp4", fps=30)
    write_mp4(vid(FRAMES, 16, 16), tmp / "face.mp4", fps=30)
    args = [f"image={tmp / 'ref.png'}", f"pose_video={tmp / 'pose.mp4'}", f"face_video={tmp / 'face.mp4'}"]
    if mode == "replace":
        write_mp4(vid(FRAMES, H, W), tmp / "bg.mp4", fps=30)
        mask = np.zeros((FRAMES, H, W, 3), np.uint8)
        mask[:, 10:30, 20:40] = 255
        write_mp4(mask, tmp / "mask.mp4", fps=30)
        args += [f"background_video={tmp / 'bg.mp4'}", f"mask_video={tmp / 'mask.mp4'}"]
    return args


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "renderer.cli", "generate", "model=tiny_animate", *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


@pytest.mark.parametrize("mode", ["animate", "replace"])
def test_generate_renders_both_modes_on_cpu(tmp_path, mode):
    args = _inputs(tmp_path, mode) + [f"mode={mode}", f"out={tmp_path / 'out'}", "name=take1", "steps=2", "seed=3",
                                      "refert_num=1", "render.progress=false"]
    r = _run(args)
    assert r.returncode == 0, r.stderr[-3000:]
    video = read_video(tmp_path / "out" / "take1.mp4")
    assert video.shape == (FRAMES, H, W, 3)  # trimmed to the input length, the pose video's size
    side = json.loads((tmp_path / "out" / "take1.json").read_text())
    assert side["mode"] == mode and side["refert_num"] == 1 and side["clips"] == 2 and side["loras"] == []
    assert side["frames"] == FRAMES and side["seed"] == 3
    assert not list((tmp_path / "out").glob("*.tmp*"))  # no temporary files left behind


def test_bad_inputs_exit_2_with_field_and_fix(tmp_path):
    args = _inputs(tmp_path, "animate")
    r = _run(args + ["mode=replace", "refert_num=3", f"out={tmp_path / 'out'}", "loras=[nope.safetensors:0.5]"])
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error: shot shot:")]
    text = "\n".join(lines)
    assert "background_video: missing" in text and "mask_video: missing" in text
    assert "loras: nope.safetensors does not exist" in text
    assert not (tmp_path / "out").exists()  # nothing written
    r = _run([f"image={tmp_path / 'ref.png'}", "pose_video=/no/such.mp4", f"face_video={tmp_path / 'face.mp4'}"])
    assert r.returncode == 2 and "pose_video: /no/such.mp4 does not exist" in r.stderr
    r = _run(args + ["refert_num=3"])
    assert r.returncode == 2 and "refert_num: 3 is not supported: use 1 or 5" in r.stderr
    (tmp_path / "ckpt").mkdir()
    r = _run(args + [f"model.checkpoint={tmp_path / 'ckpt'}"])
    assert r.returncode == 2 and "model.checkpoint: checkpoint" in r.stderr and "neither the official" in r.stderr


def test_letterbox_and_lora_specs(tmp_path):
    img = torch.ones(3, 60, 40)  # portrait into a landscape frame: bars left and right
    box = letterbox(img, 48, 64)
    assert box.shape == (3, 48, 64)
    assert box[:, :, :16].eq(-1).all() and box[:, :, 48:].eq(-1).all() and box[:, :, 17:47].eq(1).all()
    assert parse_loras(["a.safetensors", "b.ckpt:0.5", "relighting"], str(tmp_path)) == [
        ("a.safetensors", 1.0), ("b.ckpt", 0.5), (str(tmp_path / "relighting_lora.ckpt"), 1.0)]
    with pytest.raises(ValueError, match="needs model.checkpoint"):
        parse_loras(["relighting"], None)
