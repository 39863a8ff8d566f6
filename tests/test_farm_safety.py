"""The farm delivers labelled, screened and signed shots; a shot the safety gate flags is held, reported, not
rendered again on resubmit, and the job says so (exit 1). One embedded Ray cluster, the tiny model on the CPU."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
import yaml

from jobs.farm import run_job
from renderer.conf import compose
from renderer.media_provenance import make_test_chain, verify_mp4
from renderer.video_io import read_json

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_cluster():
    assert not ray.is_initialized()
    # the workers import the test detector from tests/, so they get the checkout on their path
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("farm_safety")
    manifest = base / "shots.yaml"
    manifest.write_text(yaml.safe_dump({"name": "safety", "model": "tiny_t2v", "defaults": {
        "size": "64*48", "frames": 5, "steps": 2, "label": True, "prompt": {"风格": "noir"}}, "shots": [
        {"id": "sh1", "seed": 1, "prompt": {"人物": "a keeper", "动作": "climbs", "环境": "a tower"}},
        {"id": "sh2", "seed": 2, "prompt": "a paper boat on a puddle"}]}, allow_unicode=True))
    return base, manifest, make_test_chain(base / "pki")


def job(manifest, out, chain, *extra) -> int:
    return run_job(compose([f"manifest={manifest}", f"out={out}", "render.device=cpu", "job.live_progress=false",
                            "job.max_groups=1", f"provenance.cert={chain['chain']}", f"provenance.key={chain['key']}",
                            *extra]))


def test_farm_delivers_labelled_signed_screened_shots(ray_cluster, setup):
    base, manifest, chain = setup
    out = base / "ok"
    assert job(manifest, out, chain) == 0
    for sid in ("sh1", "sh2"):
        v = verify_mp4(out / f"{sid}.mp4", trust=chain["root"])
        assert v.ok, v.lines()
        side = read_json(out / f"{sid}.json")
        assert side["safety"]["held"] is False and side["safety"]["detector"] == "nudenet-320n"
        assert side["provenance"]["visible_label"] == "AI生成草案" and v.record == side["provenance"]
    shots = {s["id"]: s for s in json.loads((out / "report.json").read_text())["shots"]}
    assert shots["sh1"]["prompt_fields"] == {"character": "a keeper", "action": "climbs", "scene": "a tower",
                                             "style": "noir"}
    assert shots["sh1"]["prompt"] == "a keeper, climbs, a tower, noir" and shots["sh1"]["c2pa_signed"] is True


def test_farm_holds_flagged_shots_and_does_not_render_them_again(ray_cluster, setup, capsys):
    base, manifest, chain = setup
    out = base / "held"
    flag = "safety.detector=tests.safety_helpers:flag_everything"
    assert job(manifest, out, chain, flag) == 1
    printed = capsys.readouterr().out
    assert "HELD sh1" in printed and f"wanrender release {out} sh1" in printed
    assert not list(out.glob("*.mp4")) and sorted(p.name for p in (out / "quarantine").glob("*.mp4")) == [
        "sh1.mp4", "sh2.mp4"]
    shots = {s["id"]: s for s in json.loads((out / "report.json").read_text())["shots"]}
    assert {s["status"] for s in shots.values()} == {"held"} and shots["sh2"]["safety"]["score"] == 0.93
    held_bytes = (out / "quarantine" / "sh1.mp4").read_bytes()
    assert job(manifest, out, chain, flag) == 1  # resubmit: nothing rendered, still held
    assert "nothing to render" in capsys.readouterr().out
    assert (out / "quarantine" / "sh1.mp4").read_bytes() == held_bytes
