"""job.tiers / per-shot `quality` on the farm: plan order (all drafts before any final), outputs per tier, and one
real job on an embedded Ray cluster (tiny model, CPU): drafts land first, then the finals, the drafts are kept."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from jobs.manifest import ManifestError, validate_manifest
from jobs.plan import ShotQueue, build_plan
from renderer.presets import load_preset


def _raw(n=3, **shot_extra):
    return {"name": "tiers", "model": "tiny_t2v", "defaults": {"size": "64*48", "frames": 5, "steps": 2},
            "shots": [{"id": f"s{i}", "prompt": f"shot {i}", "seed": i, "priority": i, **shot_extra}
                      for i in range(n)]}


def test_plan_puts_every_draft_before_any_final(tmp_path):
    preset = load_preset("tiny_t2v")
    manifest = validate_manifest(_raw(), preset)
    plan = build_plan(manifest, preset, tmp_path, tiers=["draft", "exact"])
    assert [s.id for s in plan.shots] == ["s2.draft", "s1.draft", "s0.draft", "s2", "s1", "s0"]
    queue = ShotQueue(plan.shots)
    assert [queue.pop().id for _ in range(6)] == [s.id for s in plan.shots]  # priority within a tier only
    draft, final = plan.shots[0], plan.shots[3]
    assert draft.output == "s2.draft" and final.output == "s2"
    assert (draft.spec.steps, draft.spec.sampler) == (4, "euler_lightning") and final.spec.steps == 2
    assert draft.render_hash != final.render_hash


def test_manifest_quality_field(tmp_path):
    preset = load_preset("tiny_t2v")
    raw = _raw(2)
    raw["shots"][1]["quality"] = "draft"
    plan = build_plan(validate_manifest(raw, preset), preset, tmp_path)
    assert [(s.id, s.tier) for s in plan.shots] == [("s1.draft", "draft"), ("s0", "exact")]
    raw["shots"][0]["quality"] = "drafty"
    with pytest.raises(ManifestError, match=r"s0: quality: unknown quality 'drafty': did you mean 'draft'"):
        validate_manifest(raw, preset)



def test_farm_job_renders_drafts_then_finals(tmp_path):
    ray = pytest.importorskip("ray")
    from jobs.farm import run_job
    from renderer.conf import compose
    from renderer.video_io import read_json

    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump(_raw(2)))
    out = tmp_path / "out"
    assert not ray.is_initialized()
    # address="local": start our own cluster, never join one another test or engineer left running
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False,
             logging_level="WARNING")
    try:
        rc = run_job(compose([f"manifest={manifest}", f"out={out}", "render.device=cpu", "job.live_progress=false",
                              "job.tiers=[draft,exact]", "job.max_groups=1", "cluster=local"]))
    finally:
        ray.shutdown()
    assert rc == 0
    sides = {p.stem: read_json(p) for p in out.glob("s*.json")}
    assert set(sides) == {"s0", "s1", "s0.draft", "s1.draft"}
    assert all(sides[f"s{i}.draft"]["quality"]["name"] == "draft" for i in range(2))
    assert all(sides[f"s{i}"]["final"] for i in range(2))
    # one group rendered them in order: both drafts finished before the first final
    draft_done = max(sides[f"s{i}.draft"]["rendered_at"] for i in range(2))
    final_done = min(sides[f"s{i}"]["rendered_at"] for i in range(2))
    assert draft_done <= final_done
    report = (out / "report.html").read_text()
    assert report.count('class="badge tier"') == 2
