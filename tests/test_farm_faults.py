"""Issue 15, items 2, 3 and 7: nothing corrupt under any fault, one job per output folder, a report that plays
the clips and names each failure's class. The Ray tests share one embedded instance this module starts (4 fake
GPUs; the tiny model renders on the CPU)."""
from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import yaml

from jobs.farm import FAULTS_ENV, _mark_unfinished, run_job, write_report_or_say_why
from jobs.faults import ENVIRONMENT, INPUT, PREEMPTION, RENDER, classify
from jobs.lock import LOCK_NAME, FolderLock, FolderLocked
from jobs.manifest import validate_manifest
from jobs.plan import build_plan
from jobs.scheduler import ShotRecord
from renderer import video_io as vio
from renderer.cli import main
from renderer.conf import compose
from renderer.presets import load_preset
from tests.test_preflight import small_tmpfs

T2V = load_preset("tiny_t2v")


def write_manifest(path: Path, n: int, **defaults) -> Path:
    shots = [{"id": f"s{i:02d}", "prompt": f"shot {i}: a paper boat", "seed": i,
              **({"negative_prompt": "blurry, dark"} if i == 0 else {})} for i in range(n)]
    path.write_text(yaml.safe_dump({"name": "faults", "model": "tiny_t2v",
                                    "defaults": {"size": "64*48", "frames": 5, "steps": 2, **defaults},
                                    "shots": shots}))
    return path


def job(manifest: Path, out: Path, *extra: str) -> int:
    return run_job(compose([f"manifest={manifest}", f"out={out}", "render.device=cpu", "job.live_progress=false",
                            *extra]))


def clip(frames: int = 5) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (frames, 48, 64, 3), dtype=np.uint8)


# -- classification -------------------------------------------------------------------------------------------------
def test_failures_are_classified():
    from ray.exceptions import ActorDiedError

    from renderer.pipeline import ShotError

    assert classify(ShotError("bad size")) == INPUT
    assert classify(OSError(errno.ENOSPC, "No space left on device")) == ENVIRONMENT
    assert classify(OSError(errno.EROFS, "Read-only file system")) == ENVIRONMENT
    assert classify(FileNotFoundError(errno.ENOENT, "no ffmpeg binary found: ...")) == ENVIRONMENT
    assert classify(ModuleNotFoundError("No module named 'decord'", name="decord")) == ENVIRONMENT
    assert classify(ActorDiedError()) == PREEMPTION
    assert classify(RuntimeError("CUDA error: an illegal memory access")) == RENDER
    assert classify(TimeoutError()) == RENDER


# -- writes: complete or absent -------------------------------------------------------------------------------------
def test_full_disk_leaves_no_truncated_mp4(tmp_path, monkeypatch):
    """A real tiny tmpfs, filled up: write_mp4 raises ENOSPC and leaves neither the final name nor a temp file.
    Where mounting is not permitted, an encoder that fills the disk and fails the way ffmpeg does stands in."""
    with small_tmpfs(tmp_path / "full", "96k", monkeypatch=monkeypatch) as (full, mounted):
        (full / "filler").write_bytes(b"\0" * (88 * 1024))
        if not mounted:
            fake = tmp_path / "ffmpeg"
            fake.write_text('#!/bin/sh\nfor a; do case "$a" in *.mp4) out="$a";; esac; done\ncat > /dev/null\n'
                            'printf partial > "$out"\necho "av_interleaved_write_frame(): No space left on device" >&2\n'
                            'exit 1\n')
            fake.chmod(0o755)
            monkeypatch.setattr(vio, "ffmpeg_exe", lambda: str(fake))
        target = full / "shot.mp4"
        big = np.random.default_rng(1).integers(0, 255, (9, 96, 128, 3), dtype=np.uint8)  # noise: ~300 KB H.264
        with pytest.raises(OSError) as info:
            vio.write_mp4(big, target, fps=16)
        assert info.value.errno == errno.ENOSPC
        assert sorted(p.name for p in full.iterdir()) == ["filler"]


def test_an_mp4_that_does_not_read_back_complete_is_not_kept(tmp_path, monkeypatch):
    real = vio.video_info
    monkeypatch.setattr(vio, "video_info", lambda p: {**real(p), "frames": real(p)["frames"] - 1})
    with pytest.raises(RuntimeError, match="incomplete: 4 frames"):
        vio.write_mp4(clip(), tmp_path / "s.mp4", fps=16)
    assert list(tmp_path.iterdir()) == []


def test_sidecar_json_never_holds_nan(tmp_path):
    with pytest.raises(ValueError):
        vio.write_json_atomic(tmp_path / "s.json", {"guidance": float("nan")})
    assert list(tmp_path.iterdir()) == []


def test_generate_checks_it_can_write_before_rendering(tmp_path, capsys, monkeypatch):
    import renderer.pipeline

    def no_model(*a, **k):
        raise AssertionError("rendered before finding it cannot write")

    monkeypatch.setattr(renderer.pipeline.Pipeline, "__init__", no_model)
    with small_tmpfs(tmp_path / "tiny", "16k", monkeypatch=monkeypatch) as (tiny, _):
        assert main(["generate", "prompt=a kite", f"out={tiny}/o"]) == 2
        assert "no room" in capsys.readouterr().err


def test_report_is_written_elsewhere_when_the_folder_fails(tmp_path, capsys, monkeypatch):
    import jobs.report

    manifest = validate_manifest({"shots": [{"id": "a", "prompt": "x"}]}, T2V)
    plan = build_plan(manifest, T2V, tmp_path / "out")
    records = {"a": ShotRecord(plan.shots[0], "failed", error="disk full", failure_class=ENVIRONMENT)}
    real = jobs.report.write_report

    def full_disk_once(out, *a, **k):
        if Path(out) == tmp_path / "out":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(out, *a, **k)

    monkeypatch.setattr(jobs.report, "write_report", full_disk_once)
    json_path, _ = write_report_or_say_why(tmp_path / "out", {"name": "j"}, records, 1.0)
    err = capsys.readouterr().err
    assert "could not be written" in err and str(json_path.parent) in err
    rep = json.loads(json_path.read_text())
    assert rep["shots"][0]["failure_class"] == ENVIRONMENT and "No space left" in rep["job"]["report_error"]


def test_a_shot_finished_before_ctrl_c_is_done(tmp_path):
    manifest = validate_manifest({"shots": [{"id": "a", "prompt": "x", "frames": 5},
                                            {"id": "b", "prompt": "y", "frames": 5}]}, T2V)
    plan = build_plan(manifest, T2V, tmp_path)
    a, b = plan.shots
    vio.write_mp4(clip(), a.mp4, fps=16)  # a's group wrote it; the driver had not heard back yet
    vio.write_json_atomic(vio.sidecar_path(a.mp4), {"render_hash": a.render_hash})
    records = {s.id: ShotRecord(s, "running", attempts=[{"attempt": 1, "status": "running"}]) for s in (a, b)}
    _mark_unfinished(records, "interrupted", "job interrupted (Ctrl-C)")
    assert records["a"].status == "done" and records["a"].attempts[-1]["status"] == "done"
    assert records["b"].status == "interrupted"


# -- one job per output folder --------------------------------------------------------------------------------------
def test_second_job_is_refused_with_the_holders_name(tmp_path):
    with FolderLock(tmp_path, job="first"):
        with pytest.raises(FolderLocked) as info:
            FolderLock(tmp_path, job="second").acquire()
        msg = str(info.value)
        assert "job 'first'" in msg and socket.gethostname() in msg and f"pid {os.getpid()}" in msg
        assert "job.lock_wait_s" in msg
    assert not (tmp_path / LOCK_NAME).exists()


def test_second_job_can_wait_for_the_folder(tmp_path):
    first = FolderLock(tmp_path, job="first").acquire()
    threading.Timer(1.0, first.release).start()
    notes = []
    t0 = time.monotonic()
    with FolderLock(tmp_path, job="second", wait_s=30, poll_s=0.2, notice=notes.append) as second:
        assert second.waited and 0.8 < time.monotonic() - t0 < 20
        assert json.loads((tmp_path / LOCK_NAME).read_text())["job"] == "second"
    assert any("waiting up to 30s for job 'first'" in n for n in notes)


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "job": "old",
                                                  "since": "2026-01-01T00:00:00Z"}))
    notes = []
    with FolderLock(tmp_path, job="new", notice=notes.append):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert any("stale lock of job 'old'" in n for n in notes)
    # a lock from another host is never taken over: its pid cannot be checked from here
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "elsewhere", "pid": dead.pid, "job": "remote"}))
    with pytest.raises(FolderLocked, match="job 'remote' \\(host elsewhere"):
        FolderLock(tmp_path, job="new").acquire()


def test_run_job_refuses_a_folder_another_job_holds(tmp_path, capsys):
    manifest = write_manifest(tmp_path / "m.yaml", 2)
    out = tmp_path / "out"
    with FolderLock(out, job="nightly-previs"):
        assert job(manifest, out) == 2
    err = capsys.readouterr().err
    assert "in use by job 'nightly-previs'" in err and "Traceback" not in err
    assert not ray.is_initialized() and not list(out.glob("*.mp4"))


def test_unreachable_cluster_is_an_environment_stop_with_a_report(tmp_path, monkeypatch, capsys):
    """cluster=ray at an address where nothing answers (Ray itself waits minutes; its failure is injected)."""
    def unreachable(*a, **k):
        raise ConnectionError("Could not find any running Ray instance")

    monkeypatch.setattr(ray, "init", unreachable)
    manifest = write_manifest(tmp_path / "m.yaml", 2)
    out = tmp_path / "out"
    assert job(manifest, out, "cluster=ray", "cluster.address=10.9.9.9:6379") == 3
    err = capsys.readouterr().err
    assert "cannot connect to the Ray cluster at 10.9.9.9:6379 (from cluster.address)" in err
    rep = json.loads((out / "report.json").read_text())
    assert {s["failure_class"] for s in rep["shots"]} == {ENVIRONMENT} and not (out / LOCK_NAME).exists()


# -- the farm under faults (one embedded Ray for the rest of the module) -------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster():
    assert not ray.is_initialized()
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False,
             logging_level="WARNING")
    yield
    ray.shutdown()


def test_disk_full_stops_the_job_with_the_fix_and_keeps_what_was_rendered(ray_cluster, tmp_path, monkeypatch):
    manifest = write_manifest(tmp_path / "m.yaml", 4)
    out = tmp_path / "out"
    out.mkdir()
    stale = out / ".s03.mp4.tmp-999-deadbeef.mp4"  # left by a job killed mid-write
    stale.write_bytes(b"partial")
    monkeypatch.setenv(FAULTS_ENV, "enospc:s01:1")
    rc = job(manifest, out, "job.max_groups=1", "job.max_retries=3")
    assert rc == 3
    rep = json.loads((out / "report.json").read_text())
    by_id = {s["id"]: s for s in rep["shots"]}
    assert by_id["s00"]["status"] == "done" and vio.video_info(out / "s00.mp4")["frames"] == 5
    s01 = by_id["s01"]
    assert s01["status"] == "failed" and s01["failure_class"] == ENVIRONMENT and s01["attempt_count"] == 1
    assert [a["class"] for a in s01["attempts"]] == [ENVIRONMENT]  # not retried: every shot would fail alike
    for sid in ("s02", "s03"):
        assert by_id[sid]["status"] == "failed" and by_id[sid]["attempt_count"] == 0
        assert "not started" in by_id[sid]["error"] and by_id[sid]["failure_class"] == ENVIRONMENT
    assert "free disk space" in rep["job"]["stopped"]
    assert not stale.exists() and not list(out.glob(".*tmp-*")) and not (out / "s01.mp4").exists()
    assert not (out / LOCK_NAME).exists()
    html = (out / "report.html").read_text()
    assert "environment failure" in html and "the job stopped" in html


def test_preemptions_are_retried_without_spending_the_retry_budget(ray_cluster, tmp_path, monkeypatch):
    manifest = write_manifest(tmp_path / "m.yaml", 2)
    out = tmp_path / "out"
    monkeypatch.setenv(FAULTS_ENV, "crash:s00:1,crash:s00:2,error:s01:1")
    rc = job(manifest, out, "job.max_groups=1", "job.max_retries=0")
    rep = json.loads((out / "report.json").read_text())
    by_id = {s["id"]: s for s in rep["shots"]}
    assert rc == 1
    s00 = by_id["s00"]  # lost its group twice (a preempted node), then rendered: max_retries=0 was not spent
    assert s00["status"] == "done" and [a.get("class") for a in s00["attempts"]] == [PREEMPTION, PREEMPTION, None]
    s01 = by_id["s01"]  # a render error with max_retries=0: one attempt, failed, class in the report
    assert s01["status"] == "failed" and s01["failure_class"] == RENDER and s01["attempt_count"] == 1

    # the contact sheet: the clip plays from a relative link, the negative prompt is shown, no dead dashboard link
    html = (out / "report.html").read_text()
    assert '<video controls preload="none"' in html and 'src="s00.mp4"' in html
    assert (out / "s00.mp4").is_file()
    assert "negative: blurry, dark" in html and "render failure" in html
    assert "Ray dashboard" not in html


def test_report_while_running_links_the_dashboard(tmp_path):
    from jobs.report import write_report

    manifest = validate_manifest({"shots": [{"id": "a", "prompt": "x"}]}, T2V)
    plan = build_plan(manifest, T2V, tmp_path)
    records = {"a": ShotRecord(plan.shots[0], "queued")}
    _, html = write_report(tmp_path, {"name": "j", "running": True, "dashboard": "http://127.0.0.1:8265"}, records,
                           0.0, thumbs=False)
    assert '<a href="http://127.0.0.1:8265">' in html.read_text()
    _, html = write_report(tmp_path, {"name": "j", "running": False, "dashboard": "http://127.0.0.1:8265"},
                           records, 1.0)
    assert "8265" not in html.read_text()
