"""The attention dispatcher against an fp64 reference, and the "auto" backend's choice and cache."""
import json

import pytest
import torch

from kernels import autotune
from kernels.attention import BACKENDS, attention, available_backends, reference_attention, resolved_backend
from kernels.settings import KernelSettings

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
    if backend.startswith("fp8"):  # lossy: FP8 operands, held to the FP8 bound (tests/test_fp8.py), not bf16's
        from tests.test_fp8 import ATTN_BOUND

        assert ((got - want).norm() / want.norm()).item() <= ATTN_BOUND
    else:
        assert (got - want).abs().max().item() < 2e-2  # bf16 inputs and outputs


def test_unknown_and_missing_backends_are_explained():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="unknown attention backend 'fa9'"):
        attention(q, q, q, backend="fa9")
    with pytest.raises(ValueError, match="kernels.attention='nope': choose one of auto, sdpa"):
        KernelSettings(attention="nope")
    for name in ("flash_attn", "xformers"):
        if name not in available_backends("cuda" if torch.cuda.is_available() else "cpu"):
            with pytest.raises(RuntimeError, match=f"'{name}' asked for but .* not installed"):
                attention(q, q, q, backend=name)


def test_named_backend_is_used():
    q = torch.randn(1, 4, 2, 8)
    assert torch.allclose(attention(q, q, q, backend="math"), reference_attention(q, q, q).float(), atol=1e-6)
    assert resolved_backend("math") == "math"
    assert set(CPU_BACKENDS) - {"auto"} <= set(BACKENDS)


def test_auto_is_the_default_and_is_sdpa_on_cpu():
    assert KernelSettings().attention == "auto"
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 33, 4, 16, generator=g) for _ in range(3))
    assert torch.equal(attention(q, k, v), attention(q, k, v, backend="sdpa"))  # CPU parity stays bit-exact
    assert resolved_backend("auto") == "auto:sdpa"


def test_auto_candidates_are_exact_unless_lossy_is_allowed(monkeypatch):
    """A lossy backend (FP8 attention, say) is never "auto"'s pick unless the kernel settings allow it."""
    from kernels import backends

    monkeypatch.setattr(backends, "available_backends", lambda device="cpu": ["auto", "sdpa", "sdpa_flash", "fp8x"])
    assert autotune.candidates(torch.device("cuda")) == ["sdpa", "sdpa_flash"]
    assert autotune.candidates(torch.device("cuda"), allow_lossy=True) == ["sdpa", "sdpa_flash", "fp8x"]
    assert "fp8x" not in backends.EXACT


def test_auto_traces_into_one_graph():
    """Under torch.compile the choice is a constant: no graph break around attention."""
    q = torch.randn(1, 24, 2, 8)
    fn = torch.compile(lambda a: attention(a, a, a, backend="auto") * 2, backend="eager", fullgraph=True)
    assert torch.equal(fn(q), attention(q, q, q, backend="sdpa") * 2)
    marker = vars(torch._dynamo.assume_constant_result(lambda: 0))
    assert marker and all(getattr(autotune.choose, k, None) == v for k, v in marker.items())


def test_auto_cache_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("WANRENDER_CACHE", str(tmp_path))
    assert autotune.cache_path() == tmp_path / "attention_auto.json"
    assert autotune.length_bucket(75600) == 131072 and autotune.length_bucket(32760) == 32768
    assert autotune.length_bucket(512) == 512 and autotune.length_bucket(1) == 1
    autotune._save_disk("GPU X|bfloat16|d128|q131072|k512|torch0", {"backend": "sdpa_flash", "seconds": {}})
    autotune._save_disk("GPU X|bfloat16|d128|q131072|k131072|torch0", {"backend": "sdpa_cudnn", "seconds": {}})
    data = json.loads(autotune.cache_path().read_text())
    assert {v["backend"] for v in data.values()} == {"sdpa_flash", "sdpa_cudnn"}
    autotune.forget()
    try:
        autotune._load_disk()
        assert autotune._memory["GPU X|bfloat16|d128|q131072|k131072|torch0"] == "sdpa_cudnn"
        autotune.cache_path().write_text("{not json")  # a damaged cache is ignored, not fatal
        autotune.forget()
        autotune._load_disk()
        assert autotune._memory == {}
    finally:
        autotune.forget()
    assert autotune.ranked(torch.device("cpu"), torch.bfloat16, 128) == "sdpa"


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_gpu
def test_gpu_auto_measures_caches_and_matches_fp64(tmp_path, monkeypatch):
    monkeypatch.setenv("WANRENDER_CACHE", str(tmp_path))
    autotune.forget()
    try:
        g = torch.Generator(device="cuda").manual_seed(1)
        q, k, v = (torch.randn(1, 3000, 8, 128, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
        got = attention(q, k, v, backend="auto")
        assert (got.double() - reference_attention(q, k, v)).abs().max().item() < 2e-2
        entry = next(iter(json.loads(autotune.cache_path().read_text()).values()))
        assert entry["backend"] in available_backends("cuda") and entry["backend"] not in ("auto", "math")
        assert entry["backend"] == min(entry["seconds"], key=entry["seconds"].get)
        attention(q, k, v)
        assert resolved_backend("auto") == f"auto:{entry['backend']}"
        # measuring off: the fixed ranking (cuDNN first on Hopper)
        autotune.forget()
        autotune.set_measuring(False)
        monkeypatch.setenv("WANRENDER_CACHE", str(tmp_path / "empty"))
        name = autotune.choose(q.device, q.dtype, 128, 5000, 5000)
        if torch.cuda.get_device_capability()[0] == 9:
            assert name == "sdpa_cudnn"
        got = attention(q, k, v, backend=name)
        assert (got.double() - reference_attention(q, k, v)).abs().max().item() < 2e-2
    finally:
        autotune.set_measuring(None)
        autotune.forget()
