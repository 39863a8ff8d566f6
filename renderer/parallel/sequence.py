"""Sequence parallelism: which tokens each rank holds, and how the slices come back together.

`SequenceSharder` is the `WanDiT.token_split` object.  The model calls `split` on the video tokens, the RoPE
cos/sin tables and (ti2v) the per-token time embeddings right after the embeddings, and `gather` on the head's
output.  Tokens are padded at the end to sp·n (n = ceil(L / sp)) so every rank holds n of them and every
collective has equal sizes; the sharder remembers the true length L, which the attention functions read to drop
padded keys/values (a padded key would take softmax weight from the real ones).  Padded queries are computed and
dropped by `gather`: all other layers are per token, so they cannot leak into real tokens.

Slice s = r·ulysses + u (ring position r, Ulysses position u) holds tokens [s·n, (s+1)·n): after the Ulysses
all-to-all, the ranks of one Ulysses group together hold the contiguous ring block [r·U·n, (r+1)·U·n).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

# torch 2.13 renamed all_gather_into_tensor (and warns on the old name); the GPU machines run torch 2.11
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _pad_to(x: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    extra = length - x.shape[dim]
    if extra == 0:
        return x
    pad = [0, 0] * (x.ndim - 1 - (dim % x.ndim)) + [0, extra]  # F.pad lists dims from the last one backwards
    return F.pad(x, pad)


def all_gather_dim0(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """[n, ...] on each of `size` ranks -> [size·n, ...] in group-rank order, identical on every rank."""
    if size == 1:
        return x
    x = x.contiguous()
    out = torch.empty((size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_single(out, x, group=group)
    return out


class SequenceSharder:
    """Splits tokens over ring × ulysses ranks (ulysses fastest) and gathers them back.

    ulysses_group / ring_group: the process groups of this rank's Ulysses and ring mesh slices (None when the
    degree is 1).  One sharder per model replica; it is stateful only in `seq_len`, set by each forward's split.
    """

    def __init__(self, ulysses_group, ulysses_size: int, ulysses_rank: int,
                 ring_group, ring_size: int, ring_rank: int):
        self.ulysses_group, self.ulysses_size, self.ulysses_rank = ulysses_group, ulysses_size, ulysses_rank
        self.ring_group, self.ring_size, self.ring_rank = ring_group, ring_size, ring_rank
        self.seq_len: int | None = None  # true token count L of the current forward

    # -- sizes ---------------------------------------------------------------------------------------------------
    @property
    def sp(self) -> int:
        return self.ulysses_size * self.ring_size

    @property
    def sp_rank(self) -> int:
        return self.ring_rank * self.ulysses_size + self.ulysses_rank

    def local_len(self, seq_len: int | None = None) -> int:
        """n = ceil(L / sp): tokens per rank, padding included."""
        L = self.seq_len if seq_len is None else seq_len
        return -(-L // self.sp)

    def block_valid(self, ring_rank: int) -> int:
        """Real (unpadded) tokens in ring block `ring_rank` = tokens [r·U·n, (r+1)·U·n) ∩ [0, L)."""
        block = self.ulysses_size * self.local_len()
        return max(0, min(block, self.seq_len - ring_rank * block))

    # -- TokenSplit ----------------------------------------------------------------------------------------------
    def split(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Full tokens -> this rank's slice. x: [..., L, ...] (tokens on `dim`) -> [..., n, ...]."""
        L = x.shape[dim]
        self.seq_len = L  # every split of one forward (tokens, cos, sin, e, e0) has the same L
        n = self.local_len(L)
        x = _pad_to(x, dim, n * self.sp)
        return x.narrow(dim, self.sp_rank * n, n)

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Slices -> full tokens, padding dropped. x: [..., n, ...] -> [..., L, ...], identical on all sp ranks."""
        y = x.movedim(dim, 0)  # [n, ...]: the all-gather concatenates on dim 0
        y = all_gather_dim0(y, self.ulysses_group, self.ulysses_size)  # [U·n, ...] = this ring block
        y = all_gather_dim0(y, self.ring_group, self.ring_size)  # [sp·n, ...] slices in s = r·U + u order
        return y[: self.seq_len].movedim(0, dim)
