"""Sequence-parallel self-attention: Ulysses, ring, and the two combined (USP).

Everything here replaces `WanSelfAttention.attn_fn(q, k, v)`: inputs are this rank's token slice
[B, n, Hn, Dh] (n = ceil(L / sp), padding included), output is the attention result for the same slice.

  Ulysses   one all-to-all of stacked q/k/v: [B, n, Hn, Dh] -> [B, U·n, Hn/U, Dh] (scatter heads, gather tokens),
            attention over the whole ring block, inverse all-to-all of the output.
  ring      q stays; k/v blocks travel around the ring (send to r+1, receive from r−1) while each rank attends to
            the block it holds and merges the partial results with their log-sum-exp (online softmax).
  combined  Ulysses inside, ring across: after the all-to-all each rank holds one ring block for its heads.

Padding: `SequenceSharder.block_valid(r)` is the real token count of ring block r; keys/values beyond it are
sliced off before any attention, so padding never takes softmax weight.  A block with no real token is skipped.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist

from kernels import autotune
from kernels.attention import attention
from renderer.parallel.sequence import SequenceSharder

# -------------------------------------------------------------------------------------------------------------
# all-to-all


def heads_to_tokens(xs: list[torch.Tensor], group, size: int) -> torch.Tensor:
    """Ulysses forward all-to-all of S tensors at once (q, k, v: one collective instead of three).

    xs: S × [B, n, Hn, Dh] -> [S, B, size·n, Hn/size, Dh].  Rank j receives head group j of every rank's tokens;
    the token order of the result is group-rank order, i.e. the contiguous ring block.
    """
    B, n, Hn, Dh = xs[0].shape
    Hh = Hn // size
    send = torch.empty((size, len(xs), B, n, Hh, Dh), dtype=xs[0].dtype, device=xs[0].device)
    for i, x in enumerate(xs):  # one strided copy each, straight into the send layout
        send[:, i] = x.view(B, n, size, Hh, Dh).permute(2, 0, 1, 3, 4)
    recv = torch.empty_like(send)  # recv[j] = rank j's tokens, my heads
    dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 2, 0, 3, 4, 5).reshape(len(xs), B, size * n, Hh, Dh)


def tokens_to_heads(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """Inverse all-to-all. x: [B, size·n, Hh, Dh] -> [B, n, size·Hh, Dh] (my tokens, all heads)."""
    B, Ln, Hh, Dh = x.shape
    send = x.reshape(B, size, Ln // size, Hh, Dh).transpose(0, 1).contiguous()  # [size, B, n, Hh, Dh]
    recv = torch.empty_like(send)  # recv[j] = my tokens, head group j
    dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 2, 0, 3, 4).reshape(B, Ln // size, size * Hh, Dh)


# -------------------------------------------------------------------------------------------------------------
# attention that also returns the log-sum-exp (what ring attention merges)


# scores of the explicit path are computed this many elements at a time (256 MB in fp32), so a long ring block
# costs time, not an out-of-memory error
_EXPLICIT_CHUNK_ELEMS = 1 << 26


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q·kᵀ/√Dh)·v and its log-sum-exp. q: [B, Lq, H, Dh], k/v: [B, Lk, H, Dh]
    -> out fp32 [B, Lq, H, Dh], lse fp32 [B, H, Lq] (natural log).

    SDPA does not return the LSE.  CUDA with bf16/fp16: the flash kernel behind SDPA, called through its aten op,
    which does return it (NOT YET RUN ON A GPU: `launch --check` with a ring layout verifies it; flash-attn's
    flash_attn_func(..., return_attn_probs=True) would be the alternative).  Everywhere else: an explicit fp32
    softmax, exact, computed in query chunks.
    """
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return _flash_lse(q, k, v)
    return _explicit_lse(q, k, v)


def _flash_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    Lq = q.shape[1]
    res = torch.ops.aten._scaled_dot_product_flash_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    out, lse = res[0], res[1]  # [B, H, Lq, Dh], [B, H, Lq] fp32
    return out.transpose(1, 2).float(), lse[..., :Lq].float()


def _explicit_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, Lq, H, Dh = q.shape
    kf, vf = k.float().transpose(1, 2), v.float().transpose(1, 2)  # [B, H, Lk, Dh]
    step = max(1, _EXPLICIT_CHUNK_ELEMS // max(1, B * H * k.shape[1]))
    outs, lses = [], []
    for i in range(0, Lq, step):
        qf = q[:, i:i + step].float().transpose(1, 2)  # [B, H, lq, Dh]
        scores = (qf @ kf.transpose(-1, -2)) * (1.0 / math.sqrt(Dh))  # [B, H, lq, Lk]
        lse = torch.logsumexp(scores, dim=-1)  # [B, H, lq]
        outs.append((torch.exp(scores - lse.unsqueeze(-1)) @ vf).transpose(1, 2))  # [B, lq, H, Dh]
        lses.append(lse)
    return torch.cat(outs, dim=1), torch.cat(lses, dim=-1)


def merge_partial(out: torch.Tensor | None, lse: torch.Tensor | None, out_i: torch.Tensor, lse_i: torch.Tensor):
    """Online-softmax merge of two partial attentions over disjoint key sets (all fp32).

    out: [B, Lq, H, Dh], lse: [B, H, Lq].  new_lse = log(e^lse + e^lse_i); each part is reweighted by
    e^(its lse − new_lse), which is its share of the total softmax mass.
    """
    if out is None:
        return out_i, lse_i
    new_lse = torch.logaddexp(lse, lse_i)  # [B, H, Lq]
    w = torch.exp(lse - new_lse).transpose(1, 2).unsqueeze(-1)  # [B, Lq, H, 1]
    w_i = torch.exp(lse_i - new_lse).transpose(1, 2).unsqueeze(-1)  # [B, Lq, H, 1]
    return out * w + out_i * w_i, new_lse


def plain_ring_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor | None,
                    lse: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One ring step: q's attention over one key block, merged into the running (out, lse) (None: the first).
    The plain twin of kernels/ring_triton.triton_ring_step, which does both in one kernel."""
    out_i, lse_i = attention_lse(q, k, v)  # fp32 [B, Lq, H, Dh], [B, H, Lq]
    return merge_partial(out, lse, out_i, lse_i)


def ring_step_fn(name: str):
    """The ring step by name: "plain" (attention_lse + merge_partial) or "triton" (kernels/ring_triton, one kernel)."""
    if name == "plain":
        return plain_ring_step
    if name == "triton":
        from kernels.ring_triton import triton_ring_step

        return triton_ring_step
    raise ValueError(f"unknown ring step {name!r}: choose plain or triton")


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group, size: int, rank: int,
                   valid: list[int], step: str = "plain") -> torch.Tensor:
    """Attention of this rank's queries over the keys of all `size` ring ranks.

    q: [B, Lq, H, Dh]; k/v: [B, Lb, H, Dh] = this rank's key block (padded); valid[j]: real keys in rank j's
    block.  -> [B, Lq, H, Dh] in q's dtype.  At iteration i this rank holds block (rank − i) mod size; the send
    of that block to rank+1 and the receive of the next from rank−1 run while it attends to it.  step: how a
    block is attended and merged (ring_step_fn).
    """
    step_fn = ring_step_fn(step)
    nxt = dist.get_global_rank(group, (rank + 1) % size)
    prv = dist.get_global_rank(group, (rank - 1) % size)
    kv = torch.stack([k, v]).contiguous()  # [2, B, Lb, H, Dh]: one message per hop instead of two
    out = lse = None
    for i in range(size):
        reqs = []
        if i < size - 1:
            incoming = torch.empty_like(kv)
            reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, kv, nxt, group),
                                           dist.P2POp(dist.irecv, incoming, prv, group)])
        n = valid[(rank - i) % size]
        if n > 0:  # a block of padding only (tiny grids, many ranks) would contribute nothing but NaN
            out, lse = step_fn(q, kv[0, :, :n], kv[1, :, :n], out, lse)  # fp32 [B, Lq, H, Dh], [B, H, Lq]
        for r in reqs:
            r.wait()
        if i < size - 1:
            kv = incoming
    return out.to(q.dtype)


# -------------------------------------------------------------------------------------------------------------
# the attn_fn objects


class SequenceParallelAttention:
    """`attn_fn` for Ulysses (ulysses > 1), ring (ring > 1) or both; shares its sharder with the model.

    q/k/v: [B, n, Hn, Dh] (this rank's slice) -> [B, n, Hn, Dh].
    """

    def __init__(self, sharder: SequenceSharder, backend: str = "auto", allow_lossy: bool = False,
                 agree: Callable[[str], str] | None = None, ring_step: str = "plain"):
        self.sharder = sharder
        self.ring_step = ring_step  # ring_step_fn: "plain" until the Triton step has run on a GPU
        # the pipeline's KernelSettings.attention / allow_lossy, for the non-ring case
        self.backend, self.allow_lossy = backend, allow_lossy
        self.agree = agree  # RenderGroup.agree: "auto" runs rank 0's choice on every rank
        self._agreed: set[tuple] = set()

    def _agree_on_choice(self, q: torch.Tensor, lk: int) -> None:
        """The first call of a shape is the same call on every rank (they run the same forwards): agree there."""
        key = (q.dtype, tuple(q.shape), lk)
        if self.backend != "auto" or not q.is_cuda or key in self._agreed:
            return
        B, Lq, H, Dh = q.shape
        autotune.prepare(q.device, q.dtype, B, Lq, lk, H, Dh, self.allow_lossy, self.agree)
        self._agreed.add(key)

    def block_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of one ring block's queries. q/k/v: [B, Lb, Hh, Dh] with Lb = U·n -> [B, Lb, Hh, Dh]."""
        s = self.sharder
        if s.ring_size == 1:
            n = s.block_valid(0)  # = L: the whole (padded) sequence is here; drop the padded keys
            self._agree_on_choice(q, n)
            return attention(q, k[:, :n], v[:, :n], self.backend, self.allow_lossy)  # [B, Lb, Hh, Dh]
        valid = [s.block_valid(r) for r in range(s.ring_size)]
        return ring_attention(q, k, v, s.ring_group, s.ring_size, s.ring_rank, valid, self.ring_step)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        s = self.sharder
        if s.ulysses_size == 1:
            return self.block_attention(q, k, v)
        qkv = heads_to_tokens([q, k, v], s.ulysses_group, s.ulysses_size)  # [3, B, U·n, Hn/U, Dh]
        out = self.block_attention(*qkv.unbind(0))  # [B, U·n, Hn/U, Dh]
        return tokens_to_heads(out, s.ulysses_group, s.ulysses_size)  # [B, n, Hn, Dh]


class DeepSpeedUlyssesAttention(SequenceParallelAttention):
    """Same contract, with DeepSpeed's `DistributedAttention` doing the Ulysses all-to-alls (three separate ones,
    for q, k and v) around our block attention (ring or local).  For comparison with our own all-to-all."""

    def __init__(self, sharder: SequenceSharder, backend: str = "auto", allow_lossy: bool = False,
                 agree: Callable[[str], str] | None = None):
        super().__init__(sharder, backend, allow_lossy, agree)
        try:
            import deepspeed.comm as ds_comm
            from deepspeed.sequence.layer import DistributedAttention
        except ImportError as e:
            raise RuntimeError("parallel.ulysses_impl=deepspeed needs DeepSpeed: DS_BUILD_OPS=0 pip install "
                               "--no-build-isolation deepspeed, or use ulysses_impl=own") from e
        if not ds_comm.is_initialized():
            # DeepSpeed routes its collectives through its own backend object; wrap the live torch group
            ds_comm.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False, verbose=False)
        # our layout is [B, L, H, D]: heads on dim 2 are scattered, tokens on dim 1 gathered
        self.ds = DistributedAttention(self.block_attention, sharder.ulysses_group, scatter_idx=2, gather_idx=1)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.sharder.ulysses_size == 1:
            return self.block_attention(q, k, v)
        return self.ds(q, k, v, 0)  # batch_dim_idx=0
