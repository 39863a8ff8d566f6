"""Animate shots in the draft tier on the farm: the plan (draft entries before the finals, their own output names,
the 4-step distilled schedule, a hash of their own), the up-front LoRA check (exit 2 naming the shots, the field
and the fix) and a render group's rank merging the tier's LoRA — without Ray."""
from __future__ import annotations

import torch

from jobs.farm import run_job
from renderer.conf import compose
from tests.prepare_helpers import character, plate, tiny_ckpt  # noqa: F401
from tests.test_animate_draft_cli import LORA, _tiny_lora
from tests.test_animate_farm import _args, _manifest, _plan


def test_draft_tier_plans_animate_shots_before_their_finals(tmp_path, tiny_ckpt, plate, character):  # noqa: F811
    loras = _tiny_lora(tmp_path / "loras")
    plan = _plan(tmp_path, plate, character, tiny_ckpt, "job.tiers=[draft,exact]", "quality=draft",
                 f"quality.lora_dir={loras}")
    ids = [s.id for s in plan.shots]
    assert ids == ["dance.draft", "swap.draft", "dance", "swap"]
    by = {s.id: s for s in plan.shots}
    for sid in ("dance", "swap"):
        d, e = by[f"{sid}.draft"], by[sid]
        assert d.mp4.name == f"{sid}.draft.mp4" and e.mp4.name == f"{sid}.mp4"
        assert (d.spec.steps, d.spec.sampler, d.spec.shift) == (4, "euler_lightning", 5.0)
        assert (d.spec.frames, d.spec.size) == (e.spec.frames, e.spec.size)  # from the plate, as the final
        assert d.render_hash != e.render_hash and d.tier == "draft"


def test_a_missing_draft_lora_is_refused_up_front(tmp_path, tiny_ckpt, plate, character, capsys):  # noqa: F811
    (tmp_path / "empty").mkdir()
    manifest = _manifest(tmp_path, plate, character)
    rc = run_job(compose(_args(manifest, tmp_path / "out", tiny_ckpt, "job.tiers=[draft,exact]", "quality=draft",
                               f"quality.lora_dir={tmp_path / 'empty'}")))
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "shots dance, swap: quality.lora_dir: tier draft: LoRA file(s) not found" in err and LORA in err
    assert not (tmp_path / "out").exists()


def test_a_rank_merges_the_tier_lora_and_reloads_for_the_final(tmp_path):
    from jobs.animate_shots import AnimateShots
    from renderer.pipeline import RenderOptions
    from renderer.presets import load_preset

    loras = _tiny_lora(tmp_path / "loras")
    shots = AnimateShots(load_preset("tiny_animate"), RenderOptions(device="cpu", progress=False),
                         quality_overrides={"draft": {"lora_dir": str(loras)}})
    plain = shots.stack.model.blocks[0].cross_attn.k_img.weight.clone()
    tier = shots.tier("draft")
    assert tier.loras[0].file == LORA and tier.steps == 4
    files = [(str(p), s) for p, s in tier.loras_per_expert(1, random_weights=True)[0]]
    assert files == [(str(loras / LORA), 1.0)]
    shots._use_loras([], tier_loras=files)
    merged = shots.stack.model.blocks[0].cross_attn.k_img
    assert type(merged) is torch.nn.Linear and not torch.equal(merged.weight, plain)  # merged, not a side path
    before = shots.stack
    shots._use_loras([], tier_loras=[list(f) for f in files])  # the same (as Ray ships them): no reload
    assert shots.stack is before
    shots._use_loras([])  # the final: the plain weights back
    assert torch.equal(shots.stack.model.blocks[0].cross_attn.k_img.weight, plain)


def test_draft_animate_shots_render_on_the_farm(tmp_path, tiny_ckpt, plate, character):  # noqa: F811
    """The embedded Ray cluster (our own): both Animate shots as drafts, <id>.draft.mp4 at the plate's length,
    the sidecar saying draft / not final with the merged LoRA, no final written."""
    import pytest

    from renderer.video_io import read_json, sidecar_path, video_info
    from tests.test_animate_farm import FRAMES

    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()
    loras = _tiny_lora(tmp_path / "loras")
    manifest = _manifest(tmp_path, plate, character)
    out = tmp_path / "out"
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False,
             logging_level="WARNING", runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        rc = run_job(compose(_args(manifest, out, tiny_ckpt, "job.tiers=[draft]", "quality=draft",
                                   f"quality.lora_dir={loras}")))
    finally:
        ray.shutdown()
    assert rc == 0
    for sid in ("dance", "swap"):
        mp4 = out / f"{sid}.draft.mp4"
        assert video_info(mp4)["frames"] == FRAMES and not (out / f"{sid}.mp4").exists()
        side = read_json(sidecar_path(mp4))
        assert side["final"] is False and side["quality"]["name"] == "draft"
        assert (side["steps"], side["sampler"]) == (4, "euler_lightning")
        assert side["quality"]["loras"][0]["path"] == str(loras / LORA)
