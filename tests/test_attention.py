"""The attention dispatcher against an fp64 reference."""
import pytest
import torch

from kernels.attention import BACKENDS, attention, available_backends, reference_attention, set_default_backend

CPU_BACKENDS = available_backends("cpu")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("lq,lk", [(37, 37), (19, 512)])
def test_cpu_backends_match_fp64(backend, lq, lk):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, lq, 4, 16, generator=g)
    k, v = torch.randn(2, lk, 4, 16, generator=g), torch.randn(2, lk, 4, 16, generator=g)
    got = attention(q, k, v, backend=backend)
    want = reference_attention(q, k, v)
    assert got.shape == (2, lq, 4, 16) and got.dtype == torch.float32
    assert (got.double() - want).abs().max().item() < 2e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", available_backends("cuda") if torch.cuda.is_available() else [])
def test_gpu_backends_match_fp64(backend):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 1000, 8, 128, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    got = attention(q, k, v, backend=backend).double()
    want = reference_attention(q, k, v)
    assert (got - want).abs().max().item() < 2e-2  # bf16 inputs and outputs


def test_unknown_and_missing_backends_are_explained():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="unknown attention backend 'fa9'"):
        attention(q, q, q, backend="fa9")
    with pytest.raises(ValueError, match="choose one of sdpa"):
        set_default_backend("nope")
    for name in ("flash_attn", "xformers"):
        if name not in available_backends("cuda" if torch.cuda.is_available() else "cpu"):
            with pytest.raises(RuntimeError, match=f"'{name}' asked for but .* not installed"):
                attention(q, q, q, backend=name)


def test_default_backend_is_used():
    q = torch.randn(1, 4, 2, 8)
    set_default_backend("math")
    try:
        assert torch.allclose(attention(q, q, q), reference_attention(q, q, q).float(), atol=1e-6)
    finally:
        set_default_backend("sdpa")
    assert set(CPU_BACKENDS) <= set(BACKENDS)
