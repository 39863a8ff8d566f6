"""Single-process pieces of sequence parallelism: the LSE attention, the online-softmax merge, the token sharder."""
import pytest
import torch

from kernels.attention import reference_attention
from renderer.parallel.attention import attention_lse, merge_partial
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
