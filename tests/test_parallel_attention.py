"""Single-process pieces of sequence parallelism: the LSE attention, the online-softmax merge, the token sharder;
ring attention's Triton step against its plain twin (interpreted on the CPU), also inside a 2-rank ring."""
import json
import os

import pytest
import torch

from kernels.attention import reference_attention
from renderer.parallel.attention import (attention_lse, merge_partial, plain_ring_step, ring_attention,
                                         ring_step_fn)
from renderer.parallel.sequence import SequenceSharder


def _qkv(lq=9, lk=13, heads=3, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, lq, heads, dim, generator=g), torch.randn(2, lk, heads, dim, generator=g),
            torch.randn(2, lk, heads, dim, generator=g))


def test_attention_lse_matches_reference():
    q, k, v = _qkv()
    out, lse = attention_lse(q, k, v)
    assert out.shape == q.shape and lse.shape == (2, 3, 9)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v), rtol=0, atol=1e-5)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / 8**0.5
    torch.testing.assert_close(lse.double(), scores.logsumexp(-1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("cuts", [(13,), (4, 9), (1, 5, 7), (6, 0, 7)])
def test_merging_key_chunks_equals_full_attention(cuts):
    """Ring attention's arithmetic: attend to disjoint key chunks, merge by log-sum-exp (empty chunks skipped)."""
    q, k, v = _qkv()
    out = lse = None
    start = 0
    for n in cuts:
        if n:
            o_i, l_i = attention_lse(q, k[:, start:start + n], v[:, start:start + n])
            out, lse = merge_partial(out, lse, o_i, l_i)
        start += n
    torch.testing.assert_close(out.double(), reference_attention(q, k, v), rtol=0, atol=1e-5)


@pytest.mark.parametrize("L, ulysses, ring", [(45, 2, 1), (45, 4, 1), (45, 2, 2), (5, 1, 4), (5, 2, 4), (48, 4, 2)])
def test_sharder_slices_cover_the_padded_sequence(L, ulysses, ring):
    x = torch.arange(L, dtype=torch.float32).view(1, L, 1) + 1  # [1, L, 1], padding shows up as 0
    parts, valid = [], []
    for r in range(ring):
        for u in range(ulysses):
            s = SequenceSharder(None, ulysses, u, None, ring, r)
            parts.append(s.split(x, 1))
            valid.append(s.block_valid(r))
    n = -(-L // (ulysses * ring))
    assert all(p.shape == (1, n, 1) for p in parts)
    full = torch.cat(parts, dim=1)
    assert torch.equal(full[:, :L], x) and not full[:, L:].any()
    # real tokens per ring block, as the attention functions slice them
    block = ulysses * n
    for r in range(ring):
        assert valid[r * ulysses] == int((full[0, r * block:(r + 1) * block, 0] > 0).sum())


def test_sharder_splits_tables_on_other_dims():
    s = SequenceSharder(None, 2, 1, None, 1, 0)
    cos = torch.arange(5 * 3, dtype=torch.float32).view(5, 3)  # [L, Dh/2]
    assert torch.equal(s.split(cos, 0), torch.cat([cos[3:], torch.zeros(1, 3)]))
    e0 = torch.randn(1, 5, 6, 4)  # [B, L, 6, D]
    assert torch.equal(s.split(e0, 1)[:, :2], e0[:, 3:]) and s.seq_len == 5


def test_explicit_lse_in_query_chunks(monkeypatch):
    import renderer.parallel.attention as A

    q, k, v = _qkv(lq=11)
    whole = attention_lse(q, k, v)
    monkeypatch.setattr(A, "_EXPLICIT_CHUNK_ELEMS", 2 * 3 * 13 * 4)  # 4 queries per chunk
    chunked = attention_lse(q, k, v)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)


def test_lse_convention_matches_the_aten_flash_kernel():
    """The CUDA path reads the LSE of aten's flash kernel; its CPU twin must agree with ours (natural log)."""
    q, k, v = _qkv()
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q.transpose(1, 2), k.transpose(1, 2),
                                                                         v.transpose(1, 2))[:2]
    ours_out, ours_lse = attention_lse(q, k, v)
    torch.testing.assert_close(lse, ours_lse, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.transpose(1, 2), ours_out, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# ring attention's Triton step (kernels/ring_triton.py) against its plain twin: through Triton's interpreter on the
# CPU (TRITON_INTERPRET=1, set by tests/conftest.py where there is no GPU), and on a GPU when there is one

from tests.triton_helpers import TRITON_ERROR, interpret  # noqa: E402
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or TRITON_ERROR is not None,
                               reason="needs a CUDA GPU and triton")
STEP_TOL = {torch.float32: dict(rtol=0, atol=1e-5), torch.bfloat16: dict(rtol=0, atol=2e-2)}


def _steps_over_chunks(step, q, k, v, cuts):
    out = lse = None
    start = 0
    for n in cuts:
        if n:
            out, lse = step(q, k[:, start:start + n], v[:, start:start + n], out, lse)
        start += n
    return out, lse


def _check_ring_step(device, dtype, lq, lk, heads, dim, cuts):
    from kernels.ring_triton import triton_ring_step

    g = torch.Generator().manual_seed(lq * 100 + lk)
    q, k, v = (torch.randn(2, n, heads, dim, generator=g).to(device, dtype) for n in (lq, lk, lk))
    got_out, got_lse = _steps_over_chunks(triton_ring_step, q, k, v, cuts)
    want_out, want_lse = _steps_over_chunks(plain_ring_step, q, k, v, cuts)
    assert got_out.dtype == torch.float32 and got_out.shape == want_out.shape and got_lse.shape == want_lse.shape
    torch.testing.assert_close(got_lse, want_lse, rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-2)
    torch.testing.assert_close(got_out, want_out, **STEP_TOL[dtype])
    # and both are full attention over all the keys
    torch.testing.assert_close(got_out.double().cpu(), reference_attention(q.cpu().float(), k.cpu().float(),
                                                                           v.cpu().float()), **STEP_TOL[dtype])


@interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lq, lk, heads, dim, cuts", [(9, 21, 3, 8, (5, 1, 15)), (17, 40, 2, 24, (40,)),
                                                      (3, 7, 1, 16, (3, 0, 4))])
def test_triton_ring_step_interpreted(dtype, lq, lk, heads, dim, cuts):
    """Head dims below 16 and not a power of two, query and key counts that leave partial blocks, a block of one key,
    an empty block (skipped by the caller), first step and merge steps."""
    _check_ring_step("cpu", dtype, lq, lk, heads, dim, cuts)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_ring_step_on_gpu(dtype):
    _check_ring_step("cuda", dtype, 300, 1000, 10, 128, (333, 333, 334))


def _ring_worker(rank: int, world: int, port: int, step: str, out_path: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 3 * world, 2, 16, generator=g) for _ in range(3))  # [1, L, H, Dh], same on all ranks
    valid = [3] * (world - 1) + [2]  # the last block has one padded key
    k[:, -1], v[:, -1] = 1e4, 1e4  # the padding must not count
    mine = slice(3 * rank, 3 * rank + 3)
    out = ring_attention(q[:, mine], k[:, mine], v[:, mine], dist.group.WORLD, world, rank, valid, step=step)
    torch.save(out, f"{out_path}.rank{rank}")
    dist.destroy_process_group()


@interpret
def test_ring_attention_with_the_triton_step_on_two_ranks(tmp_path):
    """ring_attention over 2 gloo ranks with the interpreted Triton step equals one process's full attention."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ring_worker, args=(2, port, "triton", str(tmp_path / "ring")), nprocs=2, join=True)
    got = torch.cat([torch.load(f"{tmp_path / 'ring'}.rank{r}", weights_only=True) for r in range(2)], dim=1)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 6, 2, 16, generator=g) for _ in range(3))
    torch.testing.assert_close(got.double(), reference_attention(q, k[:, :5], v[:, :5]), rtol=0, atol=1e-5)


def test_unknown_ring_step_is_refused():
    with pytest.raises(ValueError, match="unknown ring step 'fast': choose plain or triton"):
        ring_step_fn("fast")


@interpret
def test_ring_step_benchmark_smoke(tmp_path):
    """benchmarks.ring_step (the GPU timing of the two steps) on the CPU: both steps run, agree, and it reports."""
    from benchmarks.ring_step import main

    report = main(["--lq", "20", "--lk", "40", "--heads", "2", "--dim", "16", "--blocks", "3", "--device", "cpu",
                   "--iters", "1", "--out", str(tmp_path / "ring.json")])
    saved = json.loads((tmp_path / "ring.json").read_text())
    assert saved["max_rel_diff"] <= 1e-5 and set(saved["results"]) == {"plain", "triton"}
    assert report["results"]["triton"]["median_s"] > 0 and saved["code_version"].startswith("0.1.0+")
