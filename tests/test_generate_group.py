"""`torchrun ... wanrender generate parallel=...`: the same group code the farm runs, on CPU with gloo."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from renderer.cli import main
from renderer.video_io import read_json, read_video

ROOT = Path(__file__).resolve().parents[1]


def _torchrun(n: int, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}", "--standalone",
           "-m", "renderer.cli", "generate", *args]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("layout", ["gpus2", "ulysses2"])
def test_two_rank_render_equals_one_process(tmp_path, layout):
    common = ["model=tiny_t2v", "prompt=a red kite over a beach", "steps=3", "seed=4", "render.progress=false"]
    assert main(["generate", *common, f"out={tmp_path / 'one'}"]) == 0
    run = _torchrun(2, [*common, f"parallel={layout}", f"out={tmp_path / 'two'}"])
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = read_video(tmp_path / "one" / "shot.mp4"), read_video(tmp_path / "two" / "shot.mp4")
    assert np.abs(one.astype(int) - two.astype(int)).max() <= 1
    assert read_json(tmp_path / "two" / "shot.json")["render_hash"] == read_json(
        tmp_path / "one" / "shot.json")["render_hash"]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["shot.json", "shot.mp4"]  # rank 0 wrote


def test_layout_that_does_not_fit_the_group_is_refused(tmp_path):
    run = _torchrun(2, ["model=tiny_t2v", "prompt=x", "parallel=cfg2_ulysses2", f"out={tmp_path}"])
    assert run.returncode != 0
    assert "cfg × ulysses × ring = 2 × 2 × 1 = 4 but the render group has 2 GPUs" in run.stderr
    assert not list(tmp_path.iterdir())


def test_two_rank_render_with_the_decode_split_over_the_ranks(tmp_path):
    """render.vae_tile=true: each rank decodes one band of every frame (renderer/vae/parallel_decode, halo exchange)
    and rank 0 assembles them. The frames equal a one-process render with the untiled decode (<= 1 uint8 level);
    the 1e-5 fp32 equality of the decode itself is tests/test_vae_parallel.py's."""
    common = ["model=tiny_t2v", "prompt=a red kite", "steps=2", "seed=3", "render.progress=false"]
    assert main(["generate", *common, "render.vae_tile=false", f"out={tmp_path / 'one'}"]) == 0
    run = _torchrun(2, [*common, "parallel=ulysses2", "render.vae_tile=true", f"out={tmp_path / 'two'}"])
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = read_video(tmp_path / "one" / "shot.mp4"), read_video(tmp_path / "two" / "shot.mp4")
    assert two.shape == (9, 48, 64, 3) and two.std() > 1.0
    assert np.abs(one.astype(int) - two.astype(int)).max() <= 1
