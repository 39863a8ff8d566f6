"""Accounting on the farm: GPU-seconds per shot (group size × wall time of every attempt, failed ones included),
per job, in the sidecar, report.json / report.html / accounting.csv; job.gpu_hour_cost; job.budget_gpu_hours.

One embedded Ray cluster with fake GPUs for the module; the tiny model renders 64*48, 5 frames, 2 steps on CPU.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import ray
import yaml

from jobs.farm import FAULTS_ENV, run_job
from renderer.conf import compose
from renderer.video_io import read_json, sidecar_path


@pytest.fixture(scope="module")
def ray_cluster():
    assert not ray.is_initialized()
    ray.init(address="local", num_cpus=4, num_gpus=4, include_dashboard=False, log_to_driver=False,
             logging_level="WARNING")
    yield
    ray.shutdown()


def write_manifest(path: Path, n: int) -> Path:
    shots = [{"id": f"s{i:02d}", "prompt": f"a paper boat, take {i}", "seed": 10 + i, "priority": n - i}
             for i in range(n)]
    path.write_text(yaml.safe_dump({"name": "acct", "model": "tiny_t2v",
                                    "defaults": {"size": "64*48", "frames": 5, "steps": 2}, "shots": shots}))
    return path


def job(manifest: Path, out: Path, *extra: str) -> int:
    return run_job(compose([f"manifest={manifest}", f"out={out}", "render.device=cpu", "job.live_progress=false",
                            "job.max_groups=1", *extra]))


def test_gpu_seconds_count_group_size_and_failed_attempts(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.setenv(FAULTS_ENV, "fail:s01:1")  # s01's first attempt raises mid-shot and is retried
    out = tmp_path / "out"
    rc = job(write_manifest(tmp_path / "m.yaml", 2), out, "parallel=ulysses2", "job.gpu_hour_cost=3.6")
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    shots = {s["id"]: s for s in rep["shots"]}
    assert [a["status"] for a in shots["s01"]["attempts"]] == ["failed", "done"]
    for s in shots.values():
        for a in s["attempts"]:
            wall = a["ended_at"] - a["started_at"]
            assert a["gpus"] == 2 and wall > 0
            assert a["gpu_seconds"] == pytest.approx(2 * wall, abs=2e-3)  # group size × wall time
        assert s["gpu_seconds"] == pytest.approx(sum(a["gpu_seconds"] for a in s["attempts"]), abs=1e-3)
        assert s["cost"] == pytest.approx(s["gpu_seconds"] / 1000, rel=1e-4)  # 3.6 per GPU-hour = 1/1000 per s
    failed_attempt = shots["s01"]["attempts"][0]["gpu_seconds"]
    assert failed_attempt > 0 and shots["s01"]["gpu_seconds"] > failed_attempt
    acct = rep["accounting"]
    total = sum(s["gpu_seconds"] for s in shots.values())
    assert acct["gpu_seconds"] == pytest.approx(total, abs=1e-3)
    assert acct["cost"] == pytest.approx(total / 1000, rel=1e-4) and acct["not_started"] == []
    # the sidecar: earlier attempts (driver's figure) + this attempt up to the write, never more than the report
    side = read_json(sidecar_path(out / "s01.mp4"))["job"]
    assert side["earlier_attempts_gpu_seconds"] == pytest.approx(failed_attempt, abs=1e-3)
    assert failed_attempt < side["gpu_seconds"] <= shots["s01"]["gpu_seconds"] + 1e-3
    # the CSV export, read back
    rows = list(csv.DictReader((out / "accounting.csv").open()))
    assert [r["shot"] for r in rows] == [*shots, "TOTAL"]
    for r in rows[:-1]:
        assert float(r["gpu_seconds"]) == pytest.approx(shots[r["shot"]]["gpu_seconds"], abs=1e-3)
        assert float(r["cost"]) == pytest.approx(shots[r["shot"]]["cost"], abs=1e-6)
    assert rows[-1]["attempts"] == "3" and float(rows[-1]["gpu_seconds"]) == pytest.approx(total, abs=2e-3)
    html = (out / "report.html").read_text()
    assert f"{acct['gpu_seconds']:.1f} GPU-s" in html and "accounting.csv" in html and "at 3.6 per GPU-hour" in html


def test_budget_stops_new_shots_and_the_report_names_them(ray_cluster, tmp_path, capsys):
    out = tmp_path / "out"
    # a budget the first shot exceeds: it finishes (running work is never cut), nothing new starts
    rc = job(write_manifest(tmp_path / "m.yaml", 4), out, "job.budget_gpu_hours=0.0000001")
    assert rc == 1
    rep = json.loads((out / "report.json").read_text())
    status = {s["id"]: s["status"] for s in rep["shots"]}
    assert status == {"s00": "done", "s01": "not_started", "s02": "not_started", "s03": "not_started"}
    assert (out / "s00.mp4").is_file() and not (out / "s01.mp4").exists()
    acct = rep["accounting"]
    assert acct["budget_reached"] and acct["not_started"] == ["s01", "s02", "s03"]
    assert acct["budget_gpu_hours"] == 1e-7 and acct["gpu_seconds"] > 0
    assert all(s["attempts"] == [] for s in rep["shots"] if s["status"] == "not_started")
    html = (out / "report.html").read_text()
    assert "3 shot(s) not started: s01, s02, s03" in html
    assert "not started: s01, s02, s03" in capsys.readouterr().out
    progress = json.loads((out / "progress.json").read_text())
    assert progress["budget_reached"] and progress["shots"]["s02"]["status"] == "not_started"


@pytest.mark.parametrize("override, fix", [("job.budget_gpu_hours=-1", "job.budget_gpu_hours"),
                                           ("job.gpu_hour_cost=.nan", "job.gpu_hour_cost")])
def test_bad_accounting_settings_are_refused_before_anything_runs(tmp_path, capsys, override, fix):
    out = tmp_path / "out"
    assert job(write_manifest(tmp_path / "m.yaml", 1), out, override, "dry_run=true") == 2
    err = capsys.readouterr().err
    assert f"manifest: {fix}: must be a finite number" in err and "nothing was rendered" in err
    assert not out.exists()
