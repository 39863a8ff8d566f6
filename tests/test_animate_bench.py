"""benchmarks/animate.py on CPU (bench=animate_smoke): every figure measured and reported beside the claim rows."""
import json

from benchmarks.animate import animate_flops, main
from renderer.presets import load_preset


def test_smoke_report(tmp_path):
    assert main(["bench=animate_smoke", f"out={tmp_path}"]) == 0
    r = json.loads((tmp_path / "animate_smoke.json").read_text())
    f = r["forward"]
    assert f["median_s"] > 0 and f["floor_s"] > 0 and f["x_floor"] == f["median_s"] / f["floor_s"]
    assert r["clip"]["clips"] == 1 and r["shot"]["clips"] == 2 and r["shot"]["frames"] == 17
    for part in ("clip_encode", "vae_encode", "denoise", "vae_decode"):
        assert r["clip"]["timings_s"][part] > 0
    assert r["clip"]["projection"] == "measured"
    md = (tmp_path / "animate_smoke.md").read_text()
    assert "540" in md and "matches no Animate source" in md


def test_full_size_forward_flops_match_the_design_figure():
    """6.60 PFLOP per 720p forward (75,600 tokens), attention ~71 % (shared/design/animate.md)."""
    cfg = load_preset("animate_14b").dit
    fl = animate_flops(cfg, 75_600)
    assert abs(fl["total"] / 1e15 - 6.60) < 0.1
    assert 0.68 < (fl["self_attention"] + fl["cross_attention"]) / fl["total"] < 0.74


def test_full_size_model_has_the_official_parameter_count():
    """17,274,816,884 parameters = the official WanAnimateModel (= diffusers with added_kv_proj_dim=5120), built on
    the meta device (no memory)."""
    import torch

    from renderer.families.animate.model import AnimateDiT

    with torch.device("meta"):
        model = AnimateDiT(load_preset("animate_14b").dit)
    assert sum(p.numel() for p in model.parameters()) == 17_274_816_884
    assert len(model.face_adapter.fuser_blocks) == 8
    assert hash(load_preset("animate_14b").dit) == hash(load_preset("animate_14b").dit)  # the config is hashable


def test_draft_smoke_times_every_step_and_the_merge(tmp_path):
    """bench=animate_draft_smoke: the draft tier's 4 Euler steps at guidance 1, one clip end to end, EVERY step
    timed (nothing projected), a random LoRA of the Wan2.1-I2V 4-step layout merged and its merge timed."""
    assert main(["bench=animate_draft_smoke", f"out={tmp_path}"]) == 0
    r = json.loads((tmp_path / "animate_draft_smoke.json").read_text())
    assert r["quality"]["name"] == "draft" and (r["steps"], r["sampler"], r["guidance"]) == (4, "euler_lightning", 1.0)
    assert r["timed_steps"] == 4 and "shot" not in r
    c = r["clip"]
    assert c["projection"] == "measured" and len(c["steps_s"]) == 4 and all(x > 0 for x in c["steps_s"])
    assert sum(c["steps_s"]) <= c["timings_s"]["denoise"] + 1e-3
    for part in ("clip_encode", "vae_encode", "denoise", "vae_decode"):
        assert c["timings_s"][part] > 0
    m = r["lora_merge"]
    assert m["seconds"] > 0 and m["rank"] == [4] and m["modules"] == 4 * (12 + 6 + 1)  # tiny_animate: 4 blocks
    assert "LoRA merge at load" in (tmp_path / "animate_draft_smoke.md").read_text()
