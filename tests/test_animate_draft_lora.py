"""The Wan2.1-I2V 4-step LoRA format (lightx2v / Kijai repack) on the Animate DiT: a tiny file in the real key format
(`diffusion_model.` prefix, lora_down / lora_up / alpha, diff_b on biases, diff on norms and the patch embedding,
diff_m on the blocks' modulation, k_img / v_img of the image cross-attention) merged by renderer/lora.py against
diffusers' own loading of the same file into its WanAnimateTransformer3DModel; the draft schedule against LightX2V's
published step list."""
import copy
import logging

import pytest
import torch

from renderer.lora import LoraError, apply_loras, load_lora
from tests.animate_helpers import animate_inputs, diffusers_animate, ours_from_diffusers, rel_err

TOL = 1e-5  # fp32: max |ours − reference| / max |reference| per tensor (the paths differ in summation order)

BLOCK_LINEARS = ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                 "cross_attn.v", "cross_attn.o", "cross_attn.k_img", "cross_attn.v_img", "ffn.0", "ffn.2"]
TOP_LINEARS = ["text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2", "time_projection.1",
               "head.head", "img_emb.proj.1", "img_emb.proj.3"]
# full-weight deltas diffusers' converter drops (norm diffs: "just zeroed values"; diff_m and other .diff keys:
# "not handled yet") and LightX2V's loader adds to the weight: checked against W + scale·diff by hand
BLOCK_NORMS = ["self_attn.norm_q", "self_attn.norm_k", "cross_attn.norm_q", "cross_attn.norm_k",
               "cross_attn.norm_k_img", "norm3"]


def write_i2v_lora(path, model, rank=4, alpha=2.0, seed=0):
    """A LoRA file in the key format of lightx2v_I2V_14B_480p_cfg_step_distill_rank64_bf16.safetensors, sized for
    `model` (our module names = the official ones). Returns {key: tensor} as written."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    mods = dict(model.named_modules())
    params = dict(model.named_parameters())
    n_blocks = len(model.blocks)
    sd = {}
    linears = [f"blocks.{i}.{n}" for i in range(n_blocks) for n in BLOCK_LINEARS] + TOP_LINEARS
    for k, n in enumerate(linears):
        out_f, in_f = mods[n].weight.shape
        sd[f"diffusion_model.{n}.lora_down.weight"] = torch.randn(rank, in_f, generator=g) * 0.3
        sd[f"diffusion_model.{n}.lora_up.weight"] = torch.randn(out_f, rank, generator=g) * 0.3
        sd[f"diffusion_model.{n}.diff_b"] = torch.randn(out_f, generator=g) * 0.05
        if k % 2 == 0 and n.startswith("blocks."):  # some carry alpha (scale alpha/rank), the rest none (scale 1);
            # diffusers reads alpha in the blocks only
            sd[f"diffusion_model.{n}.alpha"] = torch.tensor(alpha)
    for i in range(n_blocks):
        for n in BLOCK_NORMS:
            sd[f"diffusion_model.blocks.{i}.{n}.diff"] = torch.randn(params[f"blocks.{i}.{n}.weight"].shape,
                                                                     generator=g) * 0.05
        sd[f"diffusion_model.blocks.{i}.norm3.diff_b"] = torch.randn(params[f"blocks.{i}.norm3.bias"].shape,
                                                                     generator=g) * 0.05
        sd[f"diffusion_model.blocks.{i}.diff_m"] = torch.randn(params[f"blocks.{i}.modulation"].shape,
                                                               generator=g) * 0.05
    for n in ("img_emb.proj.0", "img_emb.proj.4", "patch_embedding"):
        sd[f"diffusion_model.{n}.diff"] = torch.randn(params[f"{n}.weight"].shape, generator=g) * 0.05
        sd[f"diffusion_model.{n}.diff_b"] = torch.randn(params[f"{n}.bias"].shape, generator=g) * 0.05
    sd = {k: v.contiguous() for k, v in sd.items()}
    save_file(sd, str(path))
    return sd


def _dropped_by_diffusers(sd: dict) -> dict[str, torch.Tensor]:
    """{our parameter name: delta} of the keys diffusers' converter drops (norm diffs, diff_m, remaining .diff)."""
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("diffusion_model.")
        if k.endswith(".diff_m"):
            out[k.removesuffix(".diff_m") + ".modulation"] = v
        elif k.endswith(".diff"):
            out[k.removesuffix(".diff") + ".weight"] = v
        elif k.endswith(".diff_b") and ("norm" in k or k.startswith(("img_emb.proj.0", "img_emb.proj.4",
                                                                      "patch_embedding"))):
            out[k.removesuffix(".diff_b") + ".bias"] = v
    return out


@pytest.mark.parametrize("mode", ["merged", "unmerged"])
def test_i2v_lora_on_animate_matches_diffusers(tmp_path, mode):
    """Merged weights == diffusers (WanAnimatePipeline.lora_state_dict -> load_lora_adapter -> fuse_lora) plus, by
    hand, the full-weight deltas diffusers drops; every key of the file lands on a parameter of our model."""
    from diffusers import WanAnimatePipeline

    scale = 0.8
    ref = diffusers_animate(seed=3)
    base = ours_from_diffusers(ref)
    path = tmp_path / "lightx2v_I2V_14B_480p_cfg_step_distill_rank64_bf16.safetensors"
    sd = write_i2v_lora(path, base)
    lora = load_lora(path)
    assert len(lora.layers) == 4 * (len(BLOCK_LINEARS) + len(BLOCK_NORMS) + 1) + len(TOP_LINEARS) + 3

    ref.load_lora_adapter(WanAnimatePipeline.lora_state_dict(str(path)), prefix="transformer", adapter_name="draft")
    ref.fuse_lora(lora_scale=scale)
    ref.unload_lora()
    want = ours_from_diffusers(ref).state_dict()
    for name, delta in _dropped_by_diffusers(sd).items():
        want[name] = want[name] + scale * delta

    ours = apply_loras(copy.deepcopy(base), [(lora, scale)], mode)
    if mode == "merged":
        got = ours.state_dict()
        before = base.state_dict()
        changed = [k for k in got if not torch.equal(got[k], before[k])]
        assert len(changed) > 0.9 * (len(sd) - sum(k.endswith((".alpha", ".lora_up.weight")) for k in sd))
        for k in got:
            assert torch.equal(got[k], want[k]) or rel_err(got[k], want[k]) <= TOL, k
    # the forward of either mode equals the forward of the reference weights
    expect = ours_from_diffusers(ref)
    expect.load_state_dict(want)
    x, pose, face, ctx, clip = animate_inputs()
    t = torch.tensor([625.0])
    with torch.no_grad():
        y = ours(x, t, ctx, image_features=clip, pose=pose, face=face)
        y_ref = expect(x, t, ctx, image_features=clip, pose=pose, face=face)
        y_base = base(x, t, ctx, image_features=clip, pose=pose, face=face)
    assert rel_err(y, y_ref) <= TOL
    assert rel_err(y, y_base) > 1e-2  # the LoRA really acts


def test_unknown_keys_are_errors_and_absent_wan_modules_one_warning(tmp_path, caplog):
    base = ours_from_diffusers(diffusers_animate(seed=4))
    from renderer.lora import parse_lora_state_dict

    # a module of no Wan model: an error naming it
    bad = parse_lora_state_dict({"diffusion_model.blocks.0.audio_proj.lora_down.weight": torch.zeros(2, 64),
                                 "diffusion_model.blocks.0.audio_proj.lora_up.weight": torch.zeros(64, 2)},
                                name="s2v.safetensors")
    with pytest.raises(LoraError, match=r"s2v.safetensors: 1 of 1 modules match no linear layer.*blocks.0.audio_proj"):
        apply_loras(copy.deepcopy(base), [(bad, 1.0)])
    # a block past the model's depth: a LoRA for another model size, an error
    deep = parse_lora_state_dict({"blocks.39.self_attn.q.diff_b": torch.zeros(64)}, name="deep.safetensors")
    with pytest.raises(LoraError, match=r"deep.safetensors.*blocks.39.self_attn.q"):
        apply_loras(copy.deepcopy(base), [(deep, 1.0)])
    # a parameter of the wrong shape: the key is named
    wrong = parse_lora_state_dict({"blocks.1.diff_m": torch.zeros(1, 6, 32)}, name="w.safetensors")
    with pytest.raises(LoraError, match=r"key blocks.1.diff_m: modulation delta \(1, 6, 32\) != modulation"):
        apply_loras(copy.deepcopy(base), [(wrong, 1.0)])
    # a Wan backbone module Animate does not have (FLF2V's image position embedding): skipped, one warning line
    flf = parse_lora_state_dict({"img_emb.emb_pos.diff": torch.zeros(1, 514, 40),
                                 "blocks.0.cross_attn.q.diff_b": torch.ones(64)}, name="flf.safetensors")
    caplog.set_level(logging.WARNING, logger="wanrender.lora")
    m = apply_loras(copy.deepcopy(base), [(flf, 0.5)])
    torch.testing.assert_close(m.blocks[0].cross_attn.q.bias, base.blocks[0].cross_attn.q.bias + 0.5)
    lines = [r.getMessage() for r in caplog.records if r.name == "wanrender.lora" and r.levelno == logging.WARNING]
    assert lines == ["LoRA flf.safetensors: 1 module(s) this AnimateDiT does not have, skipped: img_emb.emb_pos"]


def test_draft_schedule_is_lightx2v_step_distill_list():
    """LightX2V's WanStepDistillScheduler for Animate (configs/wan22/wan_animate_lora.json): denoising_step_list
    [1000, 750, 500, 250] indexes a 1000-point grid linspace(1, 0, 1001)[:-1] shifted by 5; each step is Euler to the
    next σ, the last to 0. Our draft sampler (euler_lightning, 4 steps, shift 5) must give the same σ and t."""
    import numpy as np

    from renderer.sampling import make_sampler
    from renderer.tiers import load_tier

    tier = load_tier("draft").for_family("animate")
    assert (tier.steps, tier.sampler, tier.shift, tier.guidance) == (4, "euler_lightning", 5.0, 1.0)
    grid = np.linspace(1.0, 0.0, 1001)[:-1]
    shifted = 5.0 * grid / (1 + 4.0 * grid)
    want = shifted[[1000 - s for s in (1000, 750, 500, 250)]]  # 1, 0.9375, 0.8333, 0.625
    s = make_sampler(tier.sampler, tier.steps, tier.shift)
    assert np.allclose(s.sigmas[:-1].numpy(), want, atol=1e-6) and float(s.sigmas[-1]) == 0.0
    assert np.allclose(s.timesteps.numpy(), want * 1000, atol=1e-3)


def test_family_fields_of_a_tier():
    """conf/quality/draft.yaml names the Animate LoRA under families.animate; for_family resolves it, an unknown
    field there is an error naming it, and describe() (sidecar, render hash) holds what ran."""
    from renderer.tiers import TierError, load_tier

    draft = load_tier("draft", {"lora_dir": "/ckpt/x"})
    wan = draft.describe()
    assert [l["file"] for l in wan["loras"]] == ["high_noise_model.safetensors", "low_noise_model.safetensors"]
    assert "families" not in wan
    anim = draft.for_family("animate").describe()
    assert anim["loras"] == [{"file": "lightx2v_I2V_14B_480p_cfg_step_distill_rank64_bf16.safetensors",
                              "scale": 1.0, "expert": "all",
                              "path": "/ckpt/x/lightx2v_I2V_14B_480p_cfg_step_distill_rank64_bf16.safetensors"}]
    own = load_tier("draft", {"families": {"animate": {"lora_dir": "/ckpt/y", "loras": ["/abs/my.safetensors"]}}})
    assert [str(p) for p in own.for_family("animate").lora_paths()] == ["/abs/my.safetensors"]
    with pytest.raises(TierError, match=r"quality.families.animate: unknown field\(s\) stepz"):
        load_tier("draft", {"families": {"animate": {"stepz": 3}}})
