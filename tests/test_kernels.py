"""Fused kernels (kernels/fused.py), regional compile and the step profiler.

On the CPU: the plain versions are the model's original math bit for bit, the dispatchers fall back to them, the
blocks trace under torch.compile without graph breaks, and the profiler runs end to end on the tiny model.
Without a GPU the Triton kernels run through Triton's interpreter on the CPU (TRITON_INTERPRET=1, set by
tests/conftest.py; skipped, with the import error as the reason, only where triton cannot import).
On a GPU: Triton against plain at the real widths, fused and compiled models against the plain model.
"""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from kernels import fused
from kernels.compile import compile_blocks, compile_wanted
from renderer.families.wan22.model import DiTConfig, WanBlock, build_dit, rope_table

CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not CUDA or not fused.HAS_TRITON, reason="needs a CUDA GPU and triton")

from tests.triton_helpers import TRITON_ERROR, interpret  # noqa: E402


def _rope(l, dh, device="cpu"):
    g = torch.Generator(device=device).manual_seed(5)
    ang = torch.rand(l, dh // 2, generator=g, device=device) * 40  # [L, Dh/2]
    return ang.cos(), ang.sin()


# ------------------------------------------------------------------------------------------------------------
# the model's original math, as it was before the fused dispatchers (the yardstick)


def old_rms_rope(x, w, eps, cos, sin, heads):
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w.to(x.dtype)
    y = y.unflatten(-1, (heads, -1))  # [B, L, Hn, Dh]
    xr, xi = y.float().unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.stack([xr * c - xi * s, xr * s + xi * c], dim=-1).flatten(-2).to(x.dtype).flatten(-2)


def old_block(block, x, e0, context, rope):
    dt = block.ffn[0].weight.dtype
    shift1, scale1, gate1, shift2, scale2, gate2 = (block.modulation.float() + e0).unbind(2)
    ln = lambda v: F.layer_norm(v.float(), (v.shape[-1],), eps=block.eps)  # noqa: E731
    h = ln(x) * (1 + scale1) + shift1
    x = x + block.self_attn(h.to(dt), rope).float() * gate1
    n3 = block.norm3
    h = F.layer_norm(x.float(), (x.shape[-1],), n3.weight.float(), n3.bias.float(), block.eps)
    x = x + block.cross_attn(h.to(dt), context).float()
    h = ln(x) * (1 + scale2) + shift2
    return x + block.ffn(h.to(dt)).float() * gate2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_versions_are_the_original_math(dtype):
    g = torch.Generator().manual_seed(0)
    b, l, hn, dh = 2, 10, 4, 16
    x = torch.randn(b, l, hn * dh, generator=g).to(dtype)
    w = (torch.rand(hn * dh, generator=g) + 0.5).to(dtype)
    cos, sin = _rope(l, dh)
    assert torch.equal(fused.rms_norm_rope_plain(x, w, 1e-6, (cos, sin)), old_rms_rope(x, w, 1e-6, cos, sin, hn))
    xf = torch.randn(b, l, hn * dh, generator=g) * 3 + 1
    for rows in (1, l):  # one modulation row per sample, or per token (ti2v)
        sh, sc, gate = (torch.randn(b, rows, hn * dh, generator=g) for _ in range(3))
        want = (F.layer_norm(xf, (hn * dh,), eps=1e-6) * (1 + sc) + sh).to(dtype)
        assert torch.equal(fused.ln_modulate_plain(xf, sh, sc, 1e-6, dtype), want)
        assert torch.equal(fused.ln_modulate(xf, sh, sc, 1e-6, dtype), want)  # CPU dispatcher = plain
        y = torch.randn(b, l, hn * dh, generator=g).to(dtype)
        assert torch.equal(fused.gated_residual(xf, y, gate), xf + y.float() * gate)
        assert torch.equal(fused.gated_residual(xf, y), xf + y.float())


@pytest.mark.parametrize("per_token", [False, True])
def test_block_equals_original_block(per_token):
    cfg = DiTConfig(dim=64, ffn_dim=96, num_heads=4, num_layers=1, text_dim=24)
    torch.manual_seed(0)
    block = WanBlock(cfg).eval()
    b, grid = 2, (2, 3, 4)
    l = grid[0] * grid[1] * grid[2]
    x = torch.randn(b, l, 64)
    e0 = torch.randn(b, l if per_token else 1, 6, 64)
    ctx = torch.randn(b, 512, 64)
    rope = rope_table(grid, cfg.head_dim, cfg.rope_theta, torch.device("cpu"))
    with torch.no_grad():
        assert torch.equal(block(x, e0, ctx, rope), old_block(block, x, e0, ctx, rope))


def test_compile_decisions(monkeypatch):
    monkeypatch.delenv("WANRENDER_COMPILE", raising=False)
    assert not compile_wanted("auto", torch.device("cpu"))
    assert compile_wanted("auto", torch.device("cuda"))
    assert not compile_wanted("auto", torch.device("cuda"), sharded=True)
    assert compile_wanted("on", torch.device("cuda"), sharded=True)
    assert compile_wanted("on", torch.device("cpu")) and not compile_wanted("off", torch.device("cuda"))
    monkeypatch.setenv("WANRENDER_COMPILE", "0")
    assert not compile_wanted("auto", torch.device("cuda"))
    with pytest.raises(ValueError, match="choose auto, on or off"):
        compile_wanted("always", torch.device("cpu"))


def test_block_traces_without_graph_breaks():
    """auto attention and the dispatchers must not split the compiled block (each break costs a graph)."""
    cfg = DiTConfig(dim=64, ffn_dim=96, num_heads=4, num_layers=1, text_dim=24)
    block = WanBlock(cfg).eval()
    grid = (2, 3, 4)
    x, e0, ctx = torch.randn(1, 24, 64), torch.randn(1, 1, 6, 64), torch.randn(1, 512, 64)
    rope = rope_table(grid, cfg.head_dim, cfg.rope_theta, torch.device("cpu"))
    torch._dynamo.reset()
    with torch.no_grad():
        report = torch._dynamo.explain(block)(x, e0, ctx, rope)
    assert report.graph_break_count == 0, report.break_reasons


def test_compiled_blocks_match_eager_on_cpu():
    cfg = DiTConfig(dim=64, ffn_dim=96, num_heads=4, num_layers=2, text_dim=24)
    model = build_dit(cfg, dtype=torch.float32, seed=0)
    x, t, ctx = torch.randn(1, 16, 3, 6, 8), torch.tensor([400.0]), torch.randn(1, 7, 24)
    with torch.no_grad():
        want = model(x, t, ctx)
        compile_blocks(model, backend="eager")  # dynamo only: Inductor's C++ build is too slow for a unit test
        got = model(x, t, ctx)
        again = model(x, t, ctx)
    assert torch.equal(got, want) and torch.equal(again, want)
    assert len(model.compile_seconds) == 1  # one entry per shape, recorded once


def test_regional_compile_traces_one_graph_for_all_blocks():
    """Regional compile pays for one block: the other blocks (and a second expert) reuse its graph."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    cfg = DiTConfig(dim=64, ffn_dim=96, num_heads=4, num_layers=4, text_dim=24)
    experts = [compile_blocks(build_dit(cfg, dtype=torch.float32, seed=i), backend=counting_backend) for i in (0, 1)]
    x, t, ctx = torch.randn(1, 16, 3, 6, 8), torch.tensor([400.0]), torch.randn(1, 7, 24)
    with torch.no_grad():
        for model in experts:
            model(x, t, ctx)
            model(x, t, ctx)
    assert len(graphs) == 1


def test_custom_op_falls_back_to_plain_when_triton_fails(monkeypatch):
    """A Triton failure (here: no triton, or CPU tensors without the interpreter) costs speed, not the render."""
    monkeypatch.setattr(fused, "_triton_failed", None)
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(1, 6, 32, generator=g), torch.rand(32, generator=g) + 0.5
    cos, sin = _rope(6, 8)
    got = fused._rms_norm_rope_op(x, w, cos, sin, 1e-6)
    torch.testing.assert_close(got, fused.rms_norm_rope_plain(x, w, 1e-6, (cos, sin)), rtol=1e-5, atol=1e-5)
    if not (fused.HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"):
        assert "rms_norm_rope" in fused.triton_failure() and not fused.fused_active("cuda")
        xf, y, gate = torch.randn(1, 6, 32), torch.randn(1, 6, 32), torch.randn(1, 1, 32)
        assert torch.equal(fused._gated_residual_op(xf, y, gate), xf + y * gate)


# ------------------------------------------------------------------------------------------------------------
# Triton kernels: against the plain versions (interpreter on the CPU, or a GPU)

# bf16 outputs whose last step is the rounding (LN modulation): the Triton kernels may contract a multiply-add into
# one FMA, so a result can land one bf16 ulp (at most 2^-7 relative) away from PyTorch's; fp32: a few fp32 ulps
TOL = {torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def _rms_rope_fp64(x, w, eps, rope):
    """The exact value both versions approximate: no intermediate rounding."""
    xd = x.double()
    y = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * w.double()  # [B, L, D]
    if rope is None:
        return y
    c, s = (t.double()[:, None, :] for t in rope)  # [L, 1, Dh/2]
    yr, yi = y.unflatten(-1, (-1, c.shape[-1], 2)).unbind(-1)  # [B, L, Hn, Dh/2]
    return torch.stack([yr * c - yi * s, yr * s + yi * c], -1).flatten(-3)


def _check_rms_rope(got, plain, exact, dtype):
    """In bf16 the normalised value is rounded twice before the rotation, so a one-ulp flip of an operand (rsqrt and
    FMA differ between Triton and PyTorch) moves a rotated output by an ulp of the operand, not of the output:
    elementwise tolerances fail where the rotation cancels. Judge both against the exact value instead."""
    if dtype == torch.float32:
        torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)
        return
    assert torch.isfinite(got).all()
    if got.device.type == "cpu":  # Triton's interpreter casts to bf16 by truncation, not round-to-nearest-even
        assert (got.double() - exact).norm() / exact.norm() < 1.5e-2
        return
    err_t, err_p = (got.double() - exact), (plain.double() - exact)
    assert err_t.norm() <= 1.25 * err_p.norm() + 1e-6 * exact.norm()  # no worse than the plain math on average
    assert err_t.abs().max() <= 2 * err_p.abs().max() + 1e-6  # nor in the worst element
    assert (got.double() - plain.double()).norm() / plain.double().norm() < 1e-2


def _check_triton(device, b, l, hn, dh, dtype):
    from kernels import fused_triton as ft

    g = torch.Generator(device=device).manual_seed(hash((b, l, hn, dh)) % 1000)
    d = hn * dh
    x = (torch.randn(b, l, d, device=device, generator=g) * 2).to(dtype)  # q/k projection output
    w = (torch.rand(d, device=device, generator=g) + 0.5).to(dtype)
    cos, sin = _rope(l, dh, device)
    for rope in (None, (cos, sin)):
        got = ft.rms_norm_rope(x, w, *(rope or (None, None)), 1e-6)
        want = fused.rms_norm_rope_plain(x, w, 1e-6, rope)
        _check_rms_rope(got, want, _rms_rope_fp64(x, w, 1e-6, rope), dtype)
    xf = torch.randn(b, l, d, device=device, generator=g) * 3 + 0.5  # fp32 residual stream
    for rows in (1, l):
        sh, sc, gate = (torch.randn(b, rows, d, device=device, generator=g) for _ in range(3))
        torch.testing.assert_close(ft.ln_modulate(xf, sh, sc, 1e-6, dtype),
                                   fused.ln_modulate_plain(xf, sh, sc, 1e-6, dtype), **TOL[dtype])
        y = torch.randn(b, l, d, device=device, generator=g).to(dtype)
        torch.testing.assert_close(ft.gated_residual(xf, y, gate), fused.gated_residual_plain(xf, y, gate),
                                   rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ft.gated_residual(xf, y, None), xf + y.float(), rtol=1e-6, atol=1e-6)
    # a broadcast view of the modulation (stride 0 on tokens), not a copy
    sh_view = torch.randn(b, 6, d, device=device, generator=g)[:, 2:3]  # [B, 1, D], batch stride 6·D
    torch.testing.assert_close(ft.ln_modulate(xf, sh_view, sh_view, 1e-6, dtype),
                               fused.ln_modulate_plain(xf, sh_view, sh_view, 1e-6, dtype), **TOL[dtype])


@interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernels_interpreted(dtype):
    _check_triton("cpu", 2, 6, 3, 16, dtype)  # D = 48: not a power of two, so masking is exercised


@needs_gpu
@pytest.mark.parametrize("shape", [(1, 4096, 40, 128), (2, 300, 24, 128), (1, 77, 3, 16)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_kernels_on_gpu(shape, dtype):
    # shapes: the A14B width (D = 5120), the 5B width (3072) with batch 2, and a tiny odd one
    _check_triton("cuda", *shape, dtype)


@needs_gpu
def test_triton_outputs_are_fully_written():
    from kernels import fused_triton as ft

    b, l, d = 1, 1000, 5120
    x = torch.randn(b, l, d, device="cuda")
    # poison the allocator's blocks: the outputs reuse freed NaN-filled memory, so an unwritten element stays NaN
    torch.full((b * l * d * 4,), float("nan"), device="cuda")
    out = ft.ln_modulate(x, torch.randn(b, 1, d, device="cuda"), torch.randn(b, 1, d, device="cuda"), 1e-6,
                         torch.bfloat16)
    torch.full((b * l * d * 4,), float("nan"), device="cuda")
    res = ft.gated_residual(x, x.bfloat16(), torch.randn(b, 1, d, device="cuda"))
    assert torch.isfinite(out).all() and torch.isfinite(res).all()


def _gpu_model(layers=2):
    cfg = DiTConfig(dim=512, ffn_dim=1024, num_heads=4, num_layers=layers, text_dim=64)  # head dim 128
    model = build_dit(cfg, dtype=torch.bfloat16, device="cuda", seed=0)
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(1, 16, 5, 16, 24, device="cuda", generator=g)  # 5·8·12 = 480 tokens
    ctx = torch.randn(1, 20, 64, device="cuda", generator=g)
    return model, (x, torch.tensor([700.0], device="cuda"), ctx)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@needs_gpu
def test_fast_model_matches_plain_on_gpu():
    from kernels.settings import KernelSettings

    model, inputs = _gpu_model()
    model.use_kernels(KernelSettings(attention="sdpa", fused=False, compile="off"))
    with torch.no_grad():
        plain = model(*inputs)
    model.use_kernels(KernelSettings(attention="auto", fused=True, compile="off"))
    with torch.no_grad():
        fast = model(*inputs)
        model.use_kernels(KernelSettings(attention="auto", fused=True, compile="on"))
        compiled = model(*inputs)
    # bf16 activations through two blocks: ‖Δ‖/‖ref‖ well under 1e-2 when the math is the same
    assert _rel(fast, plain) < 1e-2 and _rel(compiled, plain) < 1e-2
    assert model.compile_seconds and torch.isfinite(compiled).all()


# ------------------------------------------------------------------------------------------------------------
# the step profiler


def test_profiler_smoke_on_cpu(tmp_path):
    from benchmarks.profile_step import count_flops, kernel_category, main

    out = tmp_path / "step.json"
    report = main(["--model", "tiny_t2v", "--size", "64*48", "--frames", "9", "--device", "cpu", "--mode", "both",
                   "--iters", "1", "--layers", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["tokens"] == 3 * 3 * 4 and saved["layers_timed"] == 1 and saved["layers_full"] == 2
    assert [r["mode"] for r in report["results"]] == ["plain", "fast"] and report["speedup"] > 0
    for r in report["results"]:
        assert r["forward_full_s"] > 0 and "timed 1 of 2 blocks" in r["scale"]
        # the profiled forward's raw times, beside its own wall time: not rescaled to the 2-block estimate
        p = r["profile"]
        assert "split_s" not in r and p["layers"] == 1 and "not rescaled" in p["what"]
        assert set(p["kernel_s"]) == {"attention", "matmul", "other"}
        assert p["kernel_s"]["matmul"] > 0 and p["kernel_s"]["attention"] > 0
        assert p["busy_s"] == pytest.approx(sum(p["kernel_s"].values()))
        assert p["idle_s"] == pytest.approx(max(p["profiled_wall_s"] - p["busy_s"], 0.0))
        assert p["busy_s"] <= p["profiled_wall_s"] * 1.01  # one thread: op self times fit inside the wall
    assert saved["provenance"]["digest"] and saved["code_version"].startswith("0.1.0+")
    # the anchor's count for T2V-A14B 1280×720×81: 4.68 PF self-attention, 1.81 PF linears
    a14b = DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, text_dim=4096)
    f = count_flops(a14b, 1, 75600, 40)
    assert abs(f["self_attention"] / 1e15 - 4.68) < 0.01 and abs(f["linear"] / 1e15 - 1.81) < 0.02
    assert kernel_category("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma") == "attention"
    assert kernel_category("sm90_xmma_gemm_bf16bf16_bf16f32") == "matmul"
    assert kernel_category("nvjet_tst_256x128_64x4") == "matmul"
    assert kernel_category("triton_per_fused_add_mul_0") == "other"


@interpret
def test_custom_ops_in_model_and_under_compile_interpreted(monkeypatch):
    """The model through the Triton custom ops (interpreted), eager and traced with fake tensors (aot_eager)."""
    from kernels import fused_triton

    monkeypatch.setattr(fused, "_triton_failed", None)
    launched = []
    for name in ("rms_norm_rope", "ln_modulate", "gated_residual"):  # count the interpreted launches
        monkeypatch.setattr(fused_triton, name, lambda *a, _f=getattr(fused_triton, name), _n=name: (
            launched.append(_n), _f(*a))[1])
    cfg = DiTConfig(dim=48, ffn_dim=64, num_heads=3, num_layers=2, text_dim=24)
    model = build_dit(cfg, dtype=torch.float32, seed=0)
    x, t, ctx = torch.randn(1, 16, 2, 4, 6), torch.tensor([300.0]), torch.randn(1, 5, 24)
    with torch.no_grad():
        want = model(x, t, ctx)
        monkeypatch.setattr(fused, "_use_triton", lambda v, on=True: on and v.dim() == 3)
        got = model(x, t, ctx)
        torch._dynamo.reset()
        compile_blocks(model, backend="aot_eager")
        compiled = model(x, t, ctx)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(compiled, want, rtol=1e-4, atol=1e-4)
    assert set(launched) == {"rms_norm_rope", "ln_modulate", "gated_residual"} and fused.triton_failure() is None
