"""Regional compile under sequence parallelism: the Ulysses collectives stay outside the compiled graphs and the
result still equals one process (fp32, gloo, 2 ranks)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_compiled_blocks_with_ulysses_equal_one_process():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANRENDER_COMPILE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "renderer.parallel.launch", "--check", "--steps", "2", "--grid", "3", "6", "10", "--ulysses", "2"]
    run = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(next(line for line in run.stdout.splitlines() if line.startswith("{")))
    assert report["max_rel_err"] <= 1e-5
    # like with like: the group's blocks compiled, and so did the one-process reference it was compared with
    assert report["compiled"] is True and report["compared"] == "compiled vs compiled"
    assert report["code_version"].startswith("0.1.0+")
