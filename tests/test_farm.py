"""The render farm on one embedded Ray cluster with fake GPUs (CPU rendering, the tiny model).

One Ray cluster for the module (starting one costs seconds on 2 cores); shots are 64*48, 5 frames, 2 steps.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import ray
import yaml

from jobs.farm import FAULTS_ENV, run_job
from renderer.conf import compose
from renderer.video_io import read_json, sidecar_path, video_info



@pytest.fixture(scope="module")
def ray_cluster():
    assert not ray.is_initialized()
    # 4 fake GPUs: the farm must reserve them like real ones, and the actors must not touch CUDA (render.device=cpu)
    ray.init(address="local", num_cpus=4, num_gpus=4, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield
    ray.shutdown()


def write_manifest(path: Path, n: int, **defaults) -> Path:
    shots = [{"id": f"s{i:02d}", "prompt": f"shot {i}: a paper boat on a puddle, take {i}", "seed": 100 + i,
              "priority": i % 3} for i in range(n)]
    path.write_text(yaml.safe_dump({"name": "farmtest", "model": "tiny_t2v",
                                    "defaults": {"size": "64*48", "frames": 5, "steps": 2, **defaults},
                                    "shots": shots}))
    return path


def job(manifest: Path, out: Path, *extra: str) -> int:
    return run_job(compose([f"manifest={manifest}", f"out={out}", "render.device=cpu", "job.live_progress=false",
                            *extra]))


def report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def snapshot(out: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out.glob("*.mp4"))}


@pytest.fixture(scope="module")
def rendered(ray_cluster, tmp_path_factory):
    """8 shots on two render groups; later tests resubmit into the same folder."""
    base = tmp_path_factory.mktemp("farm")
    manifest = write_manifest(base / "shots.yaml", 8, steps=6)  # long enough that both groups get work
    out = base / "out"
    rc = job(manifest, out, "job.max_groups=2")
    return manifest, out, rc


def test_eight_shots_on_two_groups(rendered):
    manifest, out, rc = rendered
    assert rc == 0
    rep = report(out)
    assert rep["ok"] and rep["counts"] == {"done": 8}
    groups = {a["group"] for s in rep["shots"] for a in s["attempts"]}
    assert len(groups) == 2, groups
    for s in rep["shots"]:
        mp4 = out / f"{s['id']}.mp4"
        assert video_info(mp4) == {"frames": 5, "width": 64, "height": 48, "fps": 16.0}
        side = read_json(sidecar_path(mp4))
        assert side["shot_id"] == s["id"] and side["render_hash"] == s["render_hash"]
        assert side["job"]["attempt"] == 1 and side["seed"] == s["seed"]
        assert (out / "logs" / f"{s['id']}.attempt1.log").read_text().count("step ") == 6
    # priority order: the first shot each group took is among the highest-priority ones
    firsts = sorted(rep["shots"], key=lambda s: s["attempts"][0]["started_at"])[:2]
    assert all(s["priority"] == 2 for s in firsts)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["manifest"] == str(manifest) and cfg["job"]["max_groups"] == 2
    assert (out / "report.html").stat().st_size > 1000


def test_resubmit_renders_nothing_then_only_what_changed(rendered, capsys):
    manifest, out, _ = rendered
    before = snapshot(out)
    assert job(manifest, out) == 0
    assert "nothing to render" in capsys.readouterr().out
    assert snapshot(out) == before and report(out)["counts"] == {"skipped": 8}

    # a changed prompt re-renders that shot only
    data = yaml.safe_load(manifest.read_text())
    data["shots"][3]["prompt"] += ", at night"
    manifest.write_text(yaml.safe_dump(data))
    assert job(manifest, out) == 0
    after = snapshot(out)
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {"s03.mp4"}
    rep = report(out)
    assert rep["counts"] == {"done": 1, "skipped": 7}
    # attempt numbers continue across submissions: the first run's log is kept
    assert (out / "logs" / "s03.attempt1.log").is_file() and (out / "logs" / "s03.attempt2.log").is_file()

    # partial outputs never count as done: a truncated MP4, and an MP4 whose sidecar is missing
    mp4 = out / "s05.mp4"
    mp4.write_bytes(mp4.read_bytes()[: mp4.stat().st_size // 2])
    sidecar_path(out / "s06.mp4").unlink()
    before = snapshot(out)
    assert job(manifest, out, "dry_run=true") == 0
    plan_text = capsys.readouterr().out
    assert "render (unreadable MP4)" in plan_text or "render (incomplete MP4" in plan_text
    assert "render (MP4 without sidecar" in plan_text
    assert job(manifest, out) == 0
    after = snapshot(out)
    assert {k for k in before if before[k] != after[k]} == {"s05.mp4", "s06.mp4"}
    assert video_info(mp4)["frames"] == 5 and sidecar_path(out / "s06.mp4").is_file()
    # job.force re-renders everything that is done
    assert job(manifest, out, "dry_run=true", "job.force=true") == 0
    assert capsys.readouterr().out.count("forced") == 8


def test_failures_are_retried_and_nothing_rendered_is_lost(rendered, tmp_path, monkeypatch):
    """An actor killed mid-shot, a hung shot past its timeout, and a shot that fails every attempt."""
    manifest = write_manifest(tmp_path / "shots.yaml", 5, steps=6)  # s00..s04 as in the 8-shot job
    out = tmp_path / "out"
    out.mkdir()
    # two shots rendered by an earlier submission: they must come out of this job byte-identical
    for name in ("s00.mp4", "s00.json", "s01.mp4", "s01.json"):
        shutil.copy2(rendered[1] / name, out / name)
    earlier = snapshot(out)

    monkeypatch.setenv(FAULTS_ENV, "crash:s02:1:2,hang:s03:1,error:s04:1,error:s04:2")
    rc = job(manifest, out, "job.max_retries=1", "job.shot_timeout_s=5", "job.max_groups=2")
    assert rc == 1  # s04 failed for good
    rep = report(out)
    by_id = {s["id"]: s for s in rep["shots"]}
    assert rep["counts"] == {"skipped": 2, "done": 2, "failed": 1} and not rep["ok"]
    for sid in ("s02", "s03"):  # retried on a fresh group and completed
        s = by_id[sid]
        assert s["status"] == "done" and [a["status"] for a in s["attempts"]] == ["failed", "done"]
        assert s["attempts"][0]["group"] != s["attempts"][1]["group"]
        assert video_info(out / f"{sid}.mp4")["frames"] == 5
        assert read_json(out / f"{sid}.json")["job"]["attempt"] == 2
    assert "lost" in by_id["s02"]["attempts"][0]["error"]
    assert "timed out" in by_id["s03"]["attempts"][0]["error"]
    assert "fault injection: crash" in (out / "logs" / "s02.attempt1.log").read_text()
    s04 = by_id["s04"]
    assert s04["status"] == "failed" and s04["attempt_count"] == 2 and "injected failure" in s04["error"]
    assert not (out / "s04.mp4").exists() and (out / "logs" / "s04.attempt2.log").is_file()
    assert {k: v for k, v in snapshot(out).items() if k in earlier} == earlier
    assert not list(out.glob(".*tmp-*"))  # no temp files left by killed ranks
    # three shots failed on the only node, but blocklisting it would end the job: it stays in use
    assert rep["job"]["blocklisted_nodes"] == []
    assert any("last node that can hold a group: not blocklisted" in e for e in rep["job"]["events"])
    html = (out / "report.html").read_text()
    assert "injected failure" in html and "s04.attempt2.log" in html


def test_group_of_two_ranks_forms_a_process_group(ray_cluster, tmp_path):
    """parallel.ulysses=2: G=2 GPUs per group (one placement group, two actors, gloo on CPU), rank 0 writes."""
    manifest = write_manifest(tmp_path / "shots.yaml", 2)
    out = tmp_path / "out"
    assert job(manifest, out, "parallel=ulysses2") == 0
    rep = report(out)
    assert rep["job"]["gpus_per_group"] == 2 and rep["counts"] == {"done": 2}
    for s in rep["shots"]:
        assert video_info(out / f"{s['id']}.mp4")["frames"] == 5
    logs = sorted(p.name for p in (out / "logs").iterdir())
    assert "s00.attempt1.log" in logs and "s00.attempt1.rank1.log" in logs
    assert "rank 1/2" in (out / "logs" / "s00.attempt1.rank1.log").read_text()
