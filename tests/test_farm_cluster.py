"""Issue 15, item 4: `cluster=local` always starts its own Ray instance, even while someone else's runs on the
machine and RAY_ADDRESS points at it; `cluster=ray` connects where it is told and says so.

The "someone else's" instance is started by a child Python process with its own temp dir (never `ray start` /
`ray stop`: those act on every Ray instance of the machine, other people's included), and ends with that process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import ray
import yaml

from jobs.farm import run_job
from renderer.conf import compose

ROOT = Path(__file__).resolve().parents[1]
FOREIGN = """
import sys, ray
ray.init(address="local", num_cpus=1, num_gpus=0, include_dashboard=False, _temp_dir=sys.argv[1],
         log_to_driver=False, logging_level="ERROR")
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()  # alive until the test closes our stdin
"""


@pytest.fixture(scope="module")
def foreign_ray():
    tmp = tempfile.mkdtemp(prefix="rf", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-c", FOREIGN, tmp], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    address = proc.stdout.readline().strip()
    if not address:
        proc.kill()
        pytest.skip("could not start a second Ray instance")
    yield address
    proc.stdin.close()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def manifest(tmp_path: Path) -> Path:
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"name": "own", "model": "tiny_t2v",
                                    "defaults": {"size": "64*48", "frames": 5, "steps": 2},
                                    "shots": [{"id": "a", "prompt": "a paper boat", "seed": 1}]}))
    return path


def job(path: Path, out: Path, *extra: str) -> int:
    return run_job(compose([f"manifest={path}", f"out={out}", "render.device=cpu", "job.live_progress=false",
                            "cluster.dashboard=false", *extra]))


def test_cluster_local_starts_its_own_ray_while_another_runs(foreign_ray, tmp_path, monkeypatch, capsys):
    assert not ray.is_initialized()
    monkeypatch.setenv("RAY_ADDRESS", foreign_ray)  # what Ray's default ray.init() would join
    out = tmp_path / "out"
    assert job(manifest(tmp_path), out, "cluster.num_cpus=2", "cluster.num_gpus=0") == 0
    printed = capsys.readouterr().out
    assert "Ray: started an embedded instance for this job (2 CPUs, 0 GPUs)" in printed
    assert json.loads((out / "report.json").read_text())["counts"] == {"done": 1}
    assert not ray.is_initialized()


def test_cluster_ray_connects_where_it_is_told_and_says_so(foreign_ray, tmp_path, monkeypatch, capsys):
    path = manifest(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert job(path, tmp_path / "o1", "cluster=ray", "dry_run=true") == 2
    assert "cluster=ray needs the cluster's address" in capsys.readouterr().err
    monkeypatch.setenv("RAY_ADDRESS", foreign_ray)
    assert job(path, tmp_path / "o2", "cluster=ray", "dry_run=true") == 0
    assert f"Ray cluster at {foreign_ray} (from RAY_ADDRESS)" in capsys.readouterr().out
    out = tmp_path / "o3"
    assert job(path, out, "cluster=ray", f"cluster.address={foreign_ray}") == 0
    assert f"Ray: connecting to the cluster at {foreign_ray} (from cluster.address)" in capsys.readouterr().out
    assert json.loads((out / "report.json").read_text())["counts"] == {"done": 1}


def test_ctrl_c_mid_job_keeps_finished_shots_and_leaves_no_temp(tmp_path):
    """SIGINT to a real `wanrender render` while a shot hangs: exit 130, the shots finished before are done in the
    report, nothing temporary is left, the folder's lock is released."""
    import signal
    import time

    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"name": "ctrlc", "model": "tiny_t2v",
                                    "defaults": {"size": "64*48", "frames": 5, "steps": 2},
                                    "shots": [{"id": f"s{i}", "prompt": f"boat {i}", "seed": i} for i in range(3)]}))
    out = tmp_path / "out"
    out.mkdir()
    (out / ".s1.mp4.tmp-4242-0badf00d.mp4").write_bytes(b"left by an earlier Ctrl-C")  # swept at the start
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANRENDER_FAULTS": "hang:s2:1"}
    env.pop("RAY_ADDRESS", None)
    # started with SIGINT ignored, as anything launched in the background (`cmd &`, nohup) inherits it: the CLI
    # must still stop on SIGINT (renderer/cli.py _ctrl_c_stops_the_job; the service's cancel is a SIGINT too)
    proc = subprocess.Popen([sys.executable, "-m", "renderer.cli", "render", f"manifest={path}", f"out={out}",
                             "render.device=cpu", "job.live_progress=false", "job.max_groups=1",
                             "cluster.num_cpus=1", "cluster.num_gpus=0", "cluster.dashboard=false"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (out / "logs" / "s2.attempt1.log").is_file():
        time.sleep(0.5)  # s0 and s1 are rendered and written by then (one group, manifest order)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    printed, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, printed
    assert "removed 1 temporary file(s)" in printed
    rep = json.loads((out / "report.json").read_text())
    status = {s["id"]: s["status"] for s in rep["shots"]}
    assert status == {"s0": "done", "s1": "done", "s2": "interrupted"}, printed
    assert not list(out.glob(".*tmp-*")) and not (out / ".wanrender.lock").exists()
    assert not (out / "s2.mp4").exists() and (out / "s1.mp4").is_file()
