"""renderer/tiers.py and the Lightning schedule: the draft tier's 4-step σ/timestep list against the published
Wan2.2-Lightning scheduler, expert switch, tier overrides and their error messages."""
import numpy as np
import pytest
import torch

from renderer.denoise import select_expert
from renderer.pipeline import ShotSpec
from renderer.sampling import make_sampler
from renderer.tiers import TierError, load_tier, order_by_tier


def _lightning_reference(steps: int, shift: float):
    """The published schedule, transcribed from ModelTC/Wan2.2-Lightning wan/utils/fm_solvers_euler.py:
    timesteps = linspace(1000, 0, steps+1) float32; σ = shift·(t/1000)/(1+(shift−1)·t/1000); t = σ·1000."""
    t = np.linspace(1000, 0, steps + 1, dtype=np.float32)
    s = t / 1000
    s = shift * s / (1 + (shift - 1) * s)
    return s, (s * 1000)[:-1]


def test_draft_schedule_is_the_published_lightning_step_list():
    draft = load_tier("draft")
    assert (draft.steps, draft.sampler, draft.shift, draft.guidance) == (4, "euler_lightning", 5.0, 1.0)
    s = make_sampler(draft.sampler, draft.steps, draft.shift)
    want_sigmas, want_t = _lightning_reference(4, 5.0)
    np.testing.assert_allclose(s.sigmas.numpy(), want_sigmas, rtol=0, atol=1e-7)
    np.testing.assert_allclose(s.timesteps.numpy(), want_t, rtol=0, atol=1e-4)
    # the values themselves: 1000, 937.5, 833.33, 625 (not truncated to integers as the official unipc grid is)
    np.testing.assert_allclose(s.timesteps.numpy(), [1000.0, 937.5, 2500 / 3, 625.0], rtol=1e-6)
    # 2 high-noise + 2 low-noise steps at the T2V (0.875) and I2V (0.900) boundaries
    for boundary in (0.875, 0.900):
        experts = [select_expert(t, boundary, 2, (1.0, 1.0))[0] for t in s.timesteps.tolist()]
        assert experts == [0, 0, 1, 1]


def test_lightning_euler_step_is_euler_on_its_sigmas():
    s = make_sampler("euler_lightning", 4, 5.0)
    x, v = torch.randn(1, 4, 2, 3, 3), torch.randn(1, 4, 2, 3, 3)
    for i in range(4):
        want = x + (float(s.sigmas[i + 1]) - float(s.sigmas[i])) * v
        x = s.step(v, i, x)
        torch.testing.assert_close(x, want)


def test_tier_apply_and_override():
    shot = ShotSpec(prompt="kite", steps=40, sampler="unipc", guidance=(3.0, 4.0))
    exact = load_tier("exact")
    assert exact.apply(shot) == shot and exact.is_final and exact.output_stem("s1") == "s1"
    draft = load_tier("draft")
    d = draft.apply(shot)
    assert (d.steps, d.sampler, d.shift, d.guidance) == (4, "euler_lightning", 5.0, 1.0)
    assert not draft.is_final and draft.output_stem("s1") == "s1.draft"
    more = load_tier("draft", {"steps": 6, "loras": []})
    assert more.apply(shot).steps == 6 and more.loras == ()
    fast = load_tier("fast", {"cache": {"threshold": 0.05}})
    assert fast.cache.method == "auto" and fast.cache.threshold == 0.05 and fast.linear == "fp8"
    assert fast.apply(shot) == shot  # fast keeps the exact schedule
    assert fast.describe()["cache"]["threshold"] == 0.05  # into the sidecar and render hash
    assert draft.describe() != load_tier("exact").describe()


def test_draft_loras_per_expert(tmp_path):
    draft = load_tier("draft", {"lora_dir": str(tmp_path)})
    with pytest.raises(TierError, match="LoRA file.s. not found: .*high_noise_model.safetensors"):
        draft.loras_per_expert(2, random_weights=False)
    for name in ("high_noise_model.safetensors", "low_noise_model.safetensors"):
        (tmp_path / name).write_bytes(b"")
    per = draft.loras_per_expert(2, random_weights=False)
    assert per == [[(tmp_path / "high_noise_model.safetensors", 1.0)], [(tmp_path / "low_noise_model.safetensors", 1.0)]]
    with pytest.raises(TierError, match="model has one expert: give it expert: all"):
        draft.loras_per_expert(1, random_weights=False)
    with pytest.raises(TierError, match="quality.lora_dir is not set"):
        load_tier("draft").loras_per_expert(2, random_weights=False)
    assert load_tier("draft").loras_per_expert(2, random_weights=True) == [[], []]


@pytest.mark.parametrize("name, overrides, message", [
    ("turbo", None, "quality 'turbo': use one of exact, fast, draft"),
    ("draft", {"steps": 0}, "quality.steps: 0 is not a positive"),
    ("draft", {"sampler": "ddim"}, "quality.sampler: unknown sampler 'ddim'"),
    ("fast", {"cache": {"method": "teacache"}}, "quality.cache.method: 'teacache'"),
    ("fast", {"cache": {"thresh": 0.1}}, "quality.cache: unknown field"),
    ("fast", {"allow_lossy": False}, "quality.allow_lossy: tier fast uses lossy settings"),
    ("exact", {"linear": "fp8", "allow_lossy": True}, "the exact tier cannot change"),
    ("fast", {"cache": {"method": "schedule"}}, "quality.cache.schedule: method schedule needs a schedule file"),
    ("draft", {"loras": [{"file": "a.safetensors", "expert": "middle"}]}, r"quality.loras\[0\].expert: 'middle'"),
    ("draft", {"linear": "fp8", "lora_mode": "unmerged"}, "unmerged LoRAs cannot be combined with quality.linear=fp8"),
])
def test_bad_tier_settings_name_the_field(name, overrides, message):
    with pytest.raises(TierError, match=message):
        load_tier(name, overrides)


def test_order_by_tier_puts_all_drafts_first():
    assert order_by_tier(["a", "b"], ["draft", "exact"]) == [("a", "draft"), ("b", "draft"), ("a", "exact"),
                                                            ("b", "exact")]
    with pytest.raises(TierError, match="job.tiers: 'final'"):
        order_by_tier(["a"], ["final"])


def test_cli_draft_then_exact_are_two_outputs(tmp_path, capsys):
    """`quality=draft` writes <name>.draft.mp4 with the tier in the sidecar and hash; the exact render of the same
    shot is a different output and the draft stays."""
    from renderer.cli import main
    from renderer.video_io import read_json

    out = tmp_path / "out"
    common = ["generate", "prompt=a red kite", "seed=3", f"out={out}", "name=kite", "render.progress=false"]
    assert main(common + ["quality=draft"]) == 0
    assert main(common + ["steps=2"]) == 0
    draft, exact = read_json(out / "kite.draft.json"), read_json(out / "kite.json")
    assert (out / "kite.draft.mp4").is_file() and (out / "kite.mp4").is_file()
    assert draft["quality"]["name"] == "draft" and draft["final"] is False
    assert (draft["steps"], draft["sampler"], draft["shift"]) == (4, "euler_lightning", 5.0)
    assert draft["experts_used_per_step"] == [0, 0, 1, 1]
    assert exact["quality"]["name"] == "exact" and exact["final"] is True
    assert draft["render_hash"] != exact["render_hash"]
    # a bad tier field: exit 2, one line naming the shot and the field, nothing written
    assert main(common + ["name=bad", "quality=fast", "quality.linear=int4"]) == 2
    err = capsys.readouterr().err
    assert "quality.linear: 'int4': use one of bf16, fp8" in err and "Traceback" not in err
    assert not list(out.glob("bad*"))


def test_contact_sheet_badge_for_non_final_tiers():
    from jobs.report import tier_badge

    assert tier_badge("exact") == "" and tier_badge(None) == ""
    assert 'class="badge tier"' in tier_badge("draft") and ">draft<" in tier_badge("draft")


def test_draft_pipeline_merges_each_experts_lightning_file(tmp_path):
    """quality=draft with a lora_dir: high_noise_model.safetensors goes into expert 0, low_noise_model into expert 1,
    merged as W + (alpha/rank)·up·down (the Lightning format), before anything else touches the weights."""
    from safetensors.torch import save_file

    from renderer.families.wan22.model import build_dit
    from renderer.pipeline import Pipeline, RenderOptions
    from renderer.presets import load_preset

    preset = load_preset("tiny_t2v")
    d = preset.dit.dim
    g = torch.Generator().manual_seed(0)
    deltas = {}
    for i, name in enumerate(("high_noise_model", "low_noise_model")):
        down, up = torch.randn(4, d, generator=g), torch.randn(d, 4, generator=g)
        save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": down,
                   "diffusion_model.blocks.0.self_attn.q.lora_up.weight": up,
                   "diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(2.0)}, str(tmp_path / f"{name}.safetensors"))
        deltas[i] = 0.5 * up @ down  # alpha / rank = 2 / 4
    pipe = Pipeline(preset, options=RenderOptions(device="cpu", progress=False),
                    tier=load_tier("draft", {"lora_dir": str(tmp_path)}))
    for i in range(2):
        base = build_dit(preset.dit, dtype=torch.float32, seed=preset.seed_weights + i).blocks[0].self_attn.q.weight
        got = pipe.experts[i].blocks[0].self_attn.q.weight
        torch.testing.assert_close(got, base + deltas[i], rtol=0, atol=1e-6)
    result = pipe.render(ShotSpec(prompt="kite", shot_id="k"))
    assert result.experts_used == [0, 0, 1, 1] and result.shot.sampler == "euler_lightning"
