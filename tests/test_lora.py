"""renderer/lora.py: the LoRA formats we read, merged == unmerged, and both against diffusers' and PEFT's own
loading of the same file (tiny random models, fp32 on CPU)."""
import copy

import pytest
import torch
import torch.nn.functional as F

from renderer.families.wan22.keys import official_to_diffusers
from renderer.lora import LoraError, LoraLinear, apply_loras, load_lora, parse_lora_state_dict
from tests.dit_helpers import diffusers_tiny, ours_from_diffusers, rel_err

TOL = 1e-5  # max |a - b| / max |b|, fp32: the paths differ only in summation order

# the linear layers the Lightning LoRAs target in every block (official names)
BLOCK_LINEARS = ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                 "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"]


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 3, 6, 8, generator=g)  # [B, C, F, H, W]
    context = torch.randn(1, 7, 24, generator=g)  # [B, Lc, text_dim]
    return x, torch.tensor([812.0]), context


def _forward(model, diffusers=False):
    x, t, ctx = _inputs()
    with torch.no_grad():
        if diffusers:  # diffusers does not pad the text itself; ours pads to 512 inside
            return model(x, t, F.pad(ctx, (0, 0, 0, 512 - ctx.shape[1])), return_dict=False)[0]
        return model(x, t, ctx)


def _factors(model, rank, seed, names=None):
    """Random (down, up) for each targeted linear: large enough that a LoRA visibly changes the output."""
    g = torch.Generator().manual_seed(seed)
    mods = dict(model.named_modules())
    names = names or [f"blocks.{i}.{n}" for i in range(len(model.blocks)) for n in BLOCK_LINEARS]
    out = {}
    for n in names:
        o, i = mods[n].weight.shape
        out[n] = (torch.randn(rank, i, generator=g) * 0.3, torch.randn(o, rank, generator=g) * 0.3)
    return out


def _lightx2v_file(tmp_path, model, rank=4, alpha=8.0, seed=0, name="high_noise_model.safetensors"):
    from safetensors.torch import save_file

    sd = {}
    for n, (down, up) in _factors(model, rank, seed).items():
        sd[f"diffusion_model.{n}.lora_down.weight"] = down.contiguous()
        sd[f"diffusion_model.{n}.lora_up.weight"] = up.contiguous()
        sd[f"diffusion_model.{n}.alpha"] = torch.tensor(alpha)
    path = tmp_path / name
    save_file(sd, str(path))
    return path


def test_lightx2v_merged_equals_unmerged_and_changes_output(tmp_path):
    ref = diffusers_tiny("t2v")
    base = ours_from_diffusers(ref)
    a = load_lora(_lightx2v_file(tmp_path, base, rank=4, alpha=8.0, seed=0, name="a.safetensors"))
    b = load_lora(_lightx2v_file(tmp_path, base, rank=2, alpha=1.0, seed=1, name="b.safetensors"))
    assert a.describe() == {"name": "a.safetensors", "modules": 2 * len(BLOCK_LINEARS), "ranks": [4]}
    stack = [(a, 0.7), (b, -0.4)]
    merged = apply_loras(copy.deepcopy(base), stack, "merged")
    unmerged = apply_loras(copy.deepcopy(base), stack, "unmerged")
    assert isinstance(unmerged.blocks[0].self_attn.q, LoraLinear) and unmerged.blocks[0].self_attn.q.n_loras == 2
    assert set(unmerged.state_dict()) == set(base.state_dict())  # names unchanged: checkpoints still load
    y0, ym, yu = _forward(base), _forward(merged), _forward(unmerged)
    assert rel_err(ym, yu) <= TOL
    assert rel_err(ym, y0) > 1e-2  # the LoRAs really act


def test_lightx2v_matches_diffusers_loading(tmp_path):
    """The same lightx2v file through diffusers' WanLoraLoaderMixin (its own key conversion and alpha handling)."""
    from diffusers import WanPipeline

    ref = diffusers_tiny("t2v", seed=2)
    ours = ours_from_diffusers(ref)
    path = _lightx2v_file(tmp_path, ours, rank=4, alpha=6.0, seed=3)
    sd = WanPipeline.lora_state_dict(str(path))
    ref.load_lora_adapter(sd, prefix="transformer", adapter_name="lightning")
    ref.set_adapters(["lightning"], weights=[0.8])
    want = _forward(ref, diffusers=True)
    lora = load_lora(path)
    for mode in ("merged", "unmerged"):
        got = _forward(apply_loras(copy.deepcopy(ours), [(lora, 0.8)], mode))
        assert rel_err(got, want) <= TOL, mode


def test_diffusers_naming_matches_diffusers_loading(tmp_path):
    """A LoRA saved in diffusers/PEFT naming (transformer.blocks.0.attn1.to_q.lora_A.weight)."""
    from safetensors.torch import save_file

    ref = diffusers_tiny("t2v", seed=4)
    ours = ours_from_diffusers(ref)
    sd = {}
    for n, (down, up) in _factors(ours, rank=3, seed=5).items():
        dn = official_to_diffusers(n + ".weight")[: -len(".weight")]
        sd[f"transformer.{dn}.lora_A.weight"] = down
        sd[f"transformer.{dn}.lora_B.weight"] = up
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(sd, str(path))
    ref.load_lora_adapter(dict(sd), prefix="transformer", adapter_name="x")  # rank 3, lora_alpha = rank
    want = _forward(ref, diffusers=True)
    got = _forward(apply_loras(copy.deepcopy(ours), [(load_lora(path), 1.0)], "merged"))
    assert rel_err(got, want) <= TOL


def test_peft_checkpoint_matches_peft(tmp_path):
    """The relighting_lora.ckpt layout ({"state_dict": PEFT keys}, official module names, r = lora_alpha in the
    official code; here alpha ≠ r to test the scale) against PEFT's own injection on our model — what the
    official WanAnimate does (add_adapter + set_peft_model_state_dict)."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    ours = ours_from_diffusers(diffusers_tiny("t2v", seed=6))
    rank, alpha = 4, 2.0
    facs = _factors(ours, rank, seed=7)
    sd = {}
    for n, (down, up) in facs.items():
        sd[f"{n}.lora_A.weight"] = down
        sd[f"{n}.lora_B.weight"] = up
    path = tmp_path / "relighting_lora.ckpt"
    torch.save({"state_dict": sd}, path)

    ref = copy.deepcopy(ours)
    ref = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(facs)), ref)
    set_peft_model_state_dict(ref, sd)
    want = _forward(ref)
    lora = load_lora(path, alpha=alpha)
    for mode in ("merged", "unmerged"):
        got = _forward(apply_loras(copy.deepcopy(ours), [(lora, 1.0)], mode))
        assert rel_err(got, want) <= TOL, mode
    # alpha from a PEFT adapter_config.json beside the file
    (tmp_path / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 2.0}')
    got = _forward(apply_loras(copy.deepcopy(ours), [(load_lora(path), 1.0)], "merged"))
    assert rel_err(got, want) <= TOL


def test_bf16_merge_rounds_once():
    """Merging into bf16 weights: the delta is summed onto the weight in fp32 and cast once, so the merged
    weight is exactly bf16(W + ΔW) — not bf16(W + bf16(ΔW)), which loses small deltas."""
    ours = ours_from_diffusers(diffusers_tiny("t2v", seed=8)).to(torch.bfloat16)
    down, up = torch.randn(2, 64), torch.randn(96, 2) * 1e-3
    lora = parse_lora_state_dict({"blocks.0.ffn.0.lora_down.weight": down, "blocks.0.ffn.0.lora_up.weight": up,
                                  "blocks.0.ffn.0.alpha": 1.0})
    w = ours.blocks[0].ffn[0].weight.detach().clone()
    merged = apply_loras(copy.deepcopy(ours), [(lora, 1.0)]).blocks[0].ffn[0].weight
    assert merged.dtype == torch.bfloat16
    assert torch.equal(merged, (w.float() + 0.5 * (up @ down)).to(torch.bfloat16))
    assert not torch.equal(merged, w)


def test_diff_and_bias_deltas_merge():
    ours = ours_from_diffusers(diffusers_tiny("t2v", seed=9))
    w, b = ours.blocks[1].self_attn.o.weight.clone(), ours.blocks[1].self_attn.o.bias.clone()
    dw, db = torch.randn_like(w), torch.randn_like(b)
    lora = parse_lora_state_dict({"diffusion_model.blocks.1.self_attn.o.diff": dw,
                                  "diffusion_model.blocks.1.self_attn.o.diff_b": db})
    for mode in ("merged", "unmerged"):
        m = apply_loras(copy.deepcopy(ours), [(lora, 0.5)], mode)
        torch.testing.assert_close(m.blocks[1].self_attn.o.weight, w + 0.5 * dw)
        torch.testing.assert_close(m.blocks[1].self_attn.o.bias, b + 0.5 * db)


def test_errors_name_the_problem(tmp_path):
    ours = ours_from_diffusers(diffusers_tiny("t2v"))
    # a module that does not exist (a LoRA for another family)
    bad = parse_lora_state_dict({"blocks.0.face_adapter.q.lora_A.weight": torch.zeros(2, 64),
                                 "blocks.0.face_adapter.q.lora_B.weight": torch.zeros(64, 2)}, name="other.safetensors")
    with pytest.raises(LoraError, match=r"other.safetensors: 1 of 1 modules match no linear layer.*face_adapter"):
        apply_loras(ours, [(bad, 1.0)])
    # factors that do not fit the layer (a LoRA for another model size)
    wrong = parse_lora_state_dict({"blocks.0.self_attn.q.lora_A.weight": torch.zeros(2, 128),
                                   "blocks.0.self_attn.q.lora_B.weight": torch.zeros(64, 2)})
    with pytest.raises(LoraError, match=r"blocks.0.self_attn.q: factors give \[64, 128\] but the layer is \[64, 64\]"):
        apply_loras(ours, [(wrong, 1.0)], "unmerged")
    with pytest.raises(LoraError, match="rank mismatch"):
        parse_lora_state_dict({"x.lora_down.weight": torch.zeros(4, 8), "x.lora_up.weight": torch.zeros(8, 3)})
    with pytest.raises(LoraError, match="only one of its two factors"):
        parse_lora_state_dict({"x.lora_down.weight": torch.zeros(4, 8)})
    with pytest.raises(LoraError, match="no known LoRA format"):
        parse_lora_state_dict({"blocks.0.self_attn.q.weight": torch.zeros(4, 8)})
    with pytest.raises(LoraError, match="does not exist"):
        load_lora(tmp_path / "missing.safetensors")
    with pytest.raises(LoraError, match="merged or unmerged"):
        apply_loras(ours, [], "fused")


def test_pickle_is_refused(tmp_path):
    """A checkpoint that needs arbitrary unpickling is refused (weights_only=True), with the file named."""
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"a.lora_A.weight": torch.zeros(1, 1)}, "cfg": object()}, path)
    with pytest.raises(LoraError, match="evil.ckpt cannot be read as a weights-only torch checkpoint"):
        load_lora(path)
