"""FP8 paths of the fast tier against their higher-precision twins, with the stated error bounds.

kernels/fp8.py: row-wise e4m3 linear (CPU reference path; torch._scaled_mm where the CPU build has it, and on a
GPU with FP8 tensor cores). The Triton kernels (row-wise quantisation, FP8 attention) under TRITON_INTERPRET=1:
tests/test_fp8_triton.py."""
import copy

import pytest
import torch
import torch.nn as nn

from kernels.fp8 import E4M3, FP8Linear, convert_to_fp8, fp8_targets, quantize_rowwise, relative_rms
from tests.dit_helpers import diffusers_tiny, ours_from_diffusers

LINEAR_BOUND = 0.05  # one layer, relative RMS against the fp32 twin (measured 0.036)
MODEL_BOUND = 0.02  # a tiny DiT with every block linear in FP8, relative RMS of the velocity (measured 0.004)
ATTN_BOUND = 0.08  # FP8 attention vs bf16 SDPA on Gaussian q/k/v, relative RMS (tests/test_fp8_triton.py states it)


def test_quantize_rowwise_roundtrip():
    x = torch.randn(8, 64) * torch.logspace(-3, 3, 8)[:, None]  # rows of very different magnitude
    q, s = quantize_rowwise(x)
    assert q.dtype == E4M3 and s.shape == (8, 1)
    assert (q.float().abs().amax(dim=1) == 448).all()  # each row uses the full e4m3 range
    err = ((q.float() * s - x).abs() / x.abs().clamp_min(1e-30))
    assert err[x.abs() > s * 2**-6].max() <= 2**-4  # normal e4m3 values: relative rounding ≤ 2^-4
    z, zs = quantize_rowwise(torch.zeros(2, 16))
    assert (zs == 1).all() and (z.float() == 0).all()


def test_fp8_linear_against_its_twin_and_scaled_mm():
    torch.manual_seed(0)
    lin = nn.Linear(256, 128)
    x = torch.randn(4, 33, 256)  # [B, L, K]
    want = lin(x)
    f8 = FP8Linear(lin, use_scaled_mm=False)
    got = f8(x)
    assert got.shape == want.shape
    err = relative_rms(got, want)
    print(f"fp8 linear relative RMS {err:.4f}")
    assert err <= LINEAR_BOUND
    assert err > 1e-4  # really quantised
    # the same quantised operands through torch._scaled_mm (CPU kernel in recent torch; tensor cores on a GPU)
    try:
        via_mm = FP8Linear(lin.to(torch.bfloat16), use_scaled_mm=True)(x.bfloat16())
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"torch._scaled_mm row-wise not available on this CPU build: {e}")
    ref = FP8Linear(lin, use_scaled_mm=False)(x.bfloat16().float())
    assert relative_rms(via_mm.float(), ref) <= 2**-7  # only bf16 output rounding (and summation order) differ


def test_fp8_targets_are_block_linears_only():
    model = ours_from_diffusers(diffusers_tiny("t2v"))
    names = fp8_targets(model)
    assert len(names) == 2 * 10
    assert all(n.startswith("blocks.") for n in names)
    assert not any(k in n for n in names for k in ("modulation", "norm", "time_", "text_embedding", "head"))


def test_tiny_dit_in_fp8_within_bound():
    ref = diffusers_tiny("t2v", seed=3)
    base = ours_from_diffusers(ref)
    fp8 = copy.deepcopy(base)
    convert_to_fp8(fp8, use_scaled_mm=False)
    assert isinstance(fp8.blocks[0].ffn[0], FP8Linear) and isinstance(fp8.head.head, nn.Linear)
    g = torch.Generator().manual_seed(1)
    x, ctx, t = torch.randn(1, 16, 3, 6, 8, generator=g), torch.randn(1, 7, 24, generator=g), torch.tensor([700.0])
    with torch.no_grad():
        want, got = base(x, t, ctx), fp8(x, t, ctx)
    err = relative_rms(got, want)
    print(f"tiny DiT fp8 linears: velocity relative RMS {err:.4f}")
    assert 1e-4 < err <= MODEL_BOUND


def test_convert_refuses_odd_shapes():
    m = nn.Sequential(nn.Linear(20, 32))
    with pytest.raises(ValueError, match="multiples of 16"):
        convert_to_fp8(m, ["0"])


def test_autotune_never_offers_the_lossy_backend():
    from kernels.autotune import candidates
    from kernels.backends import BACKEND_NAMES, EXACT, LOSSY
    from kernels.settings import KernelSettings

    assert "fp8_triton" in LOSSY and "fp8_triton" not in EXACT and "fp8_triton" in BACKEND_NAMES
    assert "fp8_triton" not in candidates("cpu") and "fp8_triton" not in candidates("cpu", allow_lossy=True)
    assert KernelSettings(attention="fp8_triton", allow_lossy=True).attention == "fp8_triton"


def test_fast_tier_kernel_settings():
    from kernels.settings import KernelSettings
    from renderer.tiers import load_tier

    k = KernelSettings()
    assert load_tier("exact").kernel_settings(k) == k  # exact never changes the kernels
    fast = load_tier("fast", {"attention": "fp8_triton"}).kernel_settings(k)
    assert fast.attention == "fp8_triton" and fast.allow_lossy


def test_autotune_ignores_a_lossy_entry_on_disk(tmp_path, monkeypatch):
    import json

    from kernels import autotune

    monkeypatch.setenv("WANRENDER_CACHE", str(tmp_path))
    autotune.cache_path().write_text(json.dumps({"k1": {"backend": "fp8_triton"}, "k2": {"backend": "sdpa_flash"},
                                                 "k3|lossy": {"backend": "fp8_triton"}}))
    autotune.forget()
    autotune._load_disk()
    try:  # an exact key naming a lossy backend (an edited file) is ignored; a lossy key may hold one
        assert "k1" not in autotune._memory and autotune._memory["k2"] == "sdpa_flash"
        assert autotune._memory["k3|lossy"] == "fp8_triton"
    finally:
        autotune.forget()


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a GPU with FP8 tensor cores")
def test_fp8_on_gpu_matches_reference():  # pragma: no cover - GPU only
    torch.manual_seed(0)
    lin = nn.Linear(5120, 13824).cuda().bfloat16()
    x = torch.randn(2, 512, 5120, device="cuda", dtype=torch.bfloat16)
    from kernels.fp8 import quantize_rowwise_triton

    xq, xs = quantize_rowwise_triton(x.view(-1, 5120))  # the Triton kernel FP8Linear runs: the eager values
    xq_ref, xs_ref = quantize_rowwise(x.view(-1, 5120))
    assert torch.equal(xs, xs_ref) and torch.equal(xq.float(), xq_ref.float())
    f8 = FP8Linear(lin, use_scaled_mm=True)
    assert f8.triton_quant
    fast = f8(x)
    emu = FP8Linear(lin, use_scaled_mm=False)(x)
    assert relative_rms(fast.float(), emu.float()) <= 2**-7
    assert relative_rms(fast.float(), lin(x).float()) <= LINEAR_BOUND
    from kernels.attention import attention
    from kernels.fp8_attention import SWEEP_CONFIGS, fp8_attention, fp8_attention_impl, prepare, prepare_reference

    q, k, v = (torch.randn(1, 4000, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ref = attention(q, k, v, "sdpa").float()
    assert relative_rms(fp8_attention(q, k, v).float(), ref) <= ATTN_BOUND
    for cfg in SWEEP_CONFIGS[:2] + SWEEP_CONFIGS[-2:]:  # pointer and TMA loads
        assert relative_rms(fp8_attention_impl(q, k, v, cfg).float(), ref) <= ATTN_BOUND, cfg
    got, want = prepare(q, k, v, SWEEP_CONFIGS[0]), prepare_reference(q, k, v, SWEEP_CONFIGS[0])
    assert all(torch.equal(a.float(), b.float()) for a, b in zip(got, want))


def test_fp8_kernels_compile_for_hopper_without_a_gpu(tmp_path):
    """The GPU path of the Triton kernels, compiled ahead of time for sm_90 (benchmarks/fp8_micro.py aot=true): the
    attention kernel uses FP8 tensor-core instructions, nothing spills, and shared memory fits an H100/H200 block."""
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("triton", reason="triton cannot be imported here")
    pytest.importorskip("triton.backends.nvidia", reason="this triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter does not compile
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    out = tmp_path / "aot.json"
    res = subprocess.run([sys.executable, "-m", "benchmarks.fp8_micro", "aot=true", "aot_configs=1", f"out={out}"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    kernels = json.loads(out.read_text())["rows"][0]["kernels"]
    assert [k["kernel"] for k in kernels] == ["fp8_attention", "prepass_qk", "prepass_v", "quantize_rowwise",
                                              "quantize_rowwise"]
    for k in kernels:
        assert "error" not in k, k
        assert k["fits"] and k.get("local_bytes", 0) == 0, k
    assert kernels[0]["fp8_wgmma"] > 0  # e4m3 × e4m3 wgmma: the FP8 tensor cores, not an upcast
