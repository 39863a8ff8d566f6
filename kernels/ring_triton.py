"""One ring-attention step as one Triton kernel: attend to a key block and merge into the running result in place.

The plain twin is renderer/parallel/attention.py's `plain_ring_step`: `attention_lse` (softmax(q·kᵀ/√Dh)·v and its
log-sum-exp) followed by `merge_partial` (the online-softmax merge of two partial attentions over disjoint keys).
Here both happen in one pass per (query block, batch·head): the scores stream through registers in key blocks
(flash-attention's running max and sum, natural log), and the block's normalised output and LSE are merged with the
accumulator read from memory — no partial output, LSE or merge weights are materialised. The accumulators are fp32
in the layouts of the plain twin: out [B, Lq, H, Dh], lse [B, H, Lq]; q/k/v may be any strides (the [B, L, H, Dh]
views ring attention holds). Imported only where triton is installed; CI runs it under TRITON_INTERPRET=1
against the plain twin (tests/test_parallel_attention.py), the GPU test on CUDA.
"""
from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl


@triton.jit
def _ring_step_kernel(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, Lq, Lk, H, scale,
                      sq_b, sq_l, sq_h, sk_b, sk_l, sk_h, sv_b, sv_l, sv_h,
                      so_b, so_l, so_h, sl_b, sl_h,
                      DH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      HAS_ACC: tl.constexpr, IEEE: tl.constexpr, DOT_FP32: tl.constexpr):
    pid_m = tl.program_id(0)  # query block
    bh = tl.program_id(1)  # batch · head
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] query indices
    dims = tl.arange(0, BLOCK_D)  # [BLOCK_D] head-dim lanes (padded to a power of two, masked)
    row_ok = rows < Lq
    dim_ok = dims < DH
    q = tl.load(q_ptr + b * sq_b + h * sq_h + rows[:, None] * sq_l + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the scaled scores
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp(score - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # running sum of exp(score - m_i) · v
    for start in range(0, Lk, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)  # [BLOCK_N] key indices
        col_ok = cols < Lk
        k = tl.load(k_ptr + b * sk_b + h * sk_h + cols[:, None] * sk_l + dims[None, :],
                    mask=col_ok[:, None] & dim_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        v = tl.load(v_ptr + b * sv_b + h * sv_h + cols[:, None] * sv_l + dims[None, :],
                    mask=col_ok[:, None] & dim_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        if IEEE:  # fp32 inputs: no TF32 rounding, so the kernel matches the fp32 plain twin
            s = tl.dot(q, tl.trans(k), input_precision="ieee")  # [BLOCK_M, BLOCK_N] fp32
        elif DOT_FP32:  # the interpreter's bf16 tl.dot is broken (triton 3.9): the same products in fp32
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))  # [BLOCK_M, BLOCK_N] fp32 accumulate of bf16/fp16 products
        s = tl.where(col_ok[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # [BLOCK_M]
        alpha = tl.exp(m_i - m_new)  # rescales what was summed under the old max
        p = tl.exp(s - m_new[:, None])  # [BLOCK_M, BLOCK_N]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        elif DOT_FP32:  # p rounded to v's dtype as below, multiplied in fp32
            pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)  # the probabilities in v's dtype, as flash attention rounds them
        acc = acc * alpha[:, None] + pv  # [BLOCK_M, BLOCK_D]
        m_i = m_new
    o = acc / l_i[:, None]  # [BLOCK_M, BLOCK_D] this block's normalised output
    lse = m_i + tl.log(l_i)  # [BLOCK_M] natural-log LSE over this block's keys
    o_ptrs = out_ptr + b * so_b + h * so_h + rows[:, None] * so_l + dims[None, :]
    l_ptrs = lse_ptr + b * sl_b + h * sl_h + rows
    if HAS_ACC:  # merge with what the earlier blocks gave: each side weighted by its share of the softmax mass
        o_prev = tl.load(o_ptrs, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        lse_prev = tl.load(l_ptrs, mask=row_ok, other=0.0)
        top = tl.maximum(lse_prev, lse)
        lse_new = top + tl.log(tl.exp(lse_prev - top) + tl.exp(lse - top))  # logaddexp
        o = o_prev * tl.exp(lse_prev - lse_new)[:, None] + o * tl.exp(lse - lse_new)[:, None]
        lse = lse_new
    tl.store(o_ptrs, o, mask=row_ok[:, None] & dim_ok[None, :])
    tl.store(l_ptrs, lse, mask=row_ok)


def _on(x: torch.Tensor):
    # launch on x's GPU whatever the current device is; CPU tensors only occur under TRITON_INTERPRET=1 (tests)
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def triton_ring_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor | None,
                     lse: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [B, Lq, H, Dh]; k/v: [B, Lk, H, Dh] (Lk >= 1); out fp32 [B, Lq, H, Dh] and lse fp32 [B, H, Lq] from the
    earlier key blocks, or None for the first -> (out, lse), updated in place when given."""
    bsz, lq, heads, dh = q.shape
    lk = k.shape[1]
    if lk == 0:
        raise ValueError("triton_ring_step: an empty key block (the caller skips those)")
    for t in (q, k, v):
        if t.stride(-1) != 1:
            raise ValueError("triton_ring_step: the head dimension must be contiguous")
    has_acc = out is not None
    if not has_acc:
        out = torch.empty(bsz, lq, heads, dh, device=q.device, dtype=torch.float32)  # [B, Lq, H, Dh]
        lse = torch.empty(bsz, heads, lq, device=q.device, dtype=torch.float32)  # [B, H, Lq]
    if out.dtype != torch.float32 or lse.dtype != torch.float32 or out.stride(-1) != 1 or lse.stride(-1) != 1:
        raise ValueError("triton_ring_step: the accumulators must be fp32 with contiguous last dimensions")
    block_d = max(16, triton.next_power_of_2(dh))  # tl.dot needs K >= 16
    block_m, block_n = (64, 64) if q.is_cuda and block_d <= 128 else (16, 16)
    grid = (triton.cdiv(lq, block_m), bsz * heads)
    with _on(q):
        _ring_step_kernel[grid](q, k, v, out, lse, lq, lk, heads, 1.0 / math.sqrt(dh),
                                q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                                v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
                                lse.stride(0), lse.stride(1), DH=dh, BLOCK_M=block_m, BLOCK_N=block_n,
                                BLOCK_D=block_d, HAS_ACC=has_acc, IEEE=q.dtype == torch.float32,
                                DOT_FP32=not q.is_cuda)  # CPU tensors: the interpreter (see the kernel)
    return out, lse
