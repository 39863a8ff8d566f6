"""FP8 attention: our own Triton kernel (FP8 QKᵀ and PV, online softmax in fp32). LOSSY.

    per (batch·head, block of BLOCK_M queries), for each block j of BLOCK_N keys:
      QK_j  = Q_q · K_qjᵀ                                     e4m3 × e4m3 -> fp32 accumulate        [BM, BN]
      c_j   = s_Q · s_Kj · log2(e)/√D                         one scalar: the scores are c_j·QK_j (log2 units)
      m     = max(m, c_j · rowmax QK_j)
      P     = 2^(c_j·QK_j − (m − log2 448)) ∈ [0, 448]        one FMA and one exp2 per score; P is e4m3-ready
      l     = l·α + ΣP;   acc = acc·α + round_e4m3(P) · V_q   the PV product accumulates in place (wgmma)  [BM, D]
    out = acc · s_V / l                                       s_V per (head, channel): applied once, at the end

Scales: Q per block of BLOCK_M query rows, K per block of BLOCK_N key rows (both per head), V per head and channel
over the whole sequence, so no per-block V factor interrupts the accumulation. P's fixed 448 (it lies in [0, 1]
after the online-softmax shift) is folded into the exp2 argument and cancels between acc and l. Only the last key
block, when the keys do not fill it, is masked (the loop is split). K smoothing (SageAttention): keys centred on
their mean over the tokens — softmax ignores the q·mean added to a query's scores, and centred blocks lose less.
The method is that of FlashAttention-3's FP8 path and SageAttention; the code is ours.

Pre-pass (`prepare`): one Triton kernel per tensor reads the [B, L, H, D] input in place (no transposes, no fp32
copies) and writes e4m3 head-first blocks plus scales — V transposed to [BH, D, Lk], K-major for Hopper's FP8 wgmma
B operand (as in Triton's fused-attention tutorial). The two reductions the scales need over all tokens (K's mean,
V's per-channel amax) are one torch reduction each. `prepare_reference` is the eager twin (the same values: tested
equal under TRITON_INTERPRET=1).

Configs (AttnConfig): blocks, warps, stages, and three switches — `tma` (tiles through host tensor descriptors),
`fast_acc` (P·V accumulated inside Hopper's FP8 tensor cores, whose adds are imprecise, over the whole key loop;
default: promoted to fp32 once per key block) and `exp16` (exponentials via ex2.approx.f16x2, GPU only).
`HOPPER_CONFIG` is what a GPU with FP8 tensor cores runs; `python -m benchmarks.fp8_micro sweep=true` times
SWEEP_CONFIGS on the GPU and prints the winner to paste there; `aot=true` compiles them all for sm_90 on any machine
(registers, spills, shared memory, FP8 wgmma). Where the GPU has no FP8 tensor cores (or in the interpreter) the
fp8 operands are upcast before tl.dot — the same quantised values.

Why the previous kernel reached only 544 TFLOP/s (0.96× cuDNN), and what changed: its pre-pass ran ~15 eager passes
over fp32 copies of q, k, v (transposes, mean, pad, abs, amax, divide, clamp, cast, V transpose: tens of ms of the
215 ms) -> three Triton kernels, one read each; it wrote an fp32 [BH, L, D] output, transposed and cast it ->
written once, in q's dtype and layout; per key block it multiplied the scores by the scale (separate pass), masked
every block, multiplied P by 448 and scaled each PV product by its block's V scale before adding it -> scale folded
into the exp2 FMA, only the last block masked, 448 folded into the exp2 offset, V scale per channel applied once.

Registered in kernels/attention.py as "fp8_triton", only where settings allow lossy kernels (never picked by
"auto"). Error bound: tests/test_fp8.py (relative RMS vs fp64 attention; 0.054 vs cuDNN bf16 at full size on an
H200 for the previous kernel).
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch

from kernels.fp8 import E4M3, E4M3_MAX, HAVE_TRITON, INV_E4M3_MAX

if HAVE_TRITON:
    import triton
    import triton.language as tl

    try:  # host-side tensor descriptors (TMA): Triton ≥ 3.4; without them only the tma=False configs run
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:  # pragma: no cover - depends on the installed Triton
        TensorDescriptor = None

    from kernels.fp8 import INV_E4M3_MAX_TL, round_to_e4m3


@dataclass(frozen=True)
class AttnConfig:
    block_m: int = 128
    block_n: int = 128
    num_warps: int = 8
    num_stages: int = 3
    tma: bool = False  # Q/K/V tiles through host tensor descriptors (TMA on Hopper) instead of pointer loads
    # fast_acc: P·V accumulates into acc inside the FP8 tensor-core instruction for the whole key loop. Hopper's FP8
    # wgmma adds in reduced precision (Triton's max_num_imprecise_acc default on sm_90), so over 75,600 keys the
    # error can grow; False (default) lets each block's product accumulate imprecisely over its BLOCK_N keys only,
    # then adds it to acc in fp32 (max_num_imprecise_acc=BLOCK_N; Triton promotes once per block)
    fast_acc: bool = False
    # exp16: the softmax exponentials through ex2.approx.f16x2 (two per MUFU issue; inline PTX, so GPU only — the
    # interpreter runs tl.math.exp2). P is rounded to e4m3 (3 mantissa bits) next, so f16's 10 bits are ample; the
    # argument in f16 is off by ≤ 2^-6 for the scores that survive e4m3 (≥ 2^-9·448), ≤ 0.6 % of P
    exp16: bool = False

    def launch(self) -> dict:
        # fp fusion spelled out: `c·qk − m` must stay one FMA, and Triton 3.10 turns the default off
        return {"num_warps": self.num_warps, "num_stages": self.num_stages, "enable_fp_fusion": True}

    def as_dict(self) -> dict:
        return asdict(self)


# THE default on a GPU with FP8 tensor cores. After `python -m benchmarks.fp8_micro sweep=true` on an H200, set it
# to the JSON's "best_config" (the run prints the line to paste).
HOPPER_CONFIG = AttnConfig(block_m=128, block_n=128, num_warps=4, num_stages=3)  # sweep on 1× H200, 2026-11-30: 0.1506 s = 1.40× cuDNN
# elsewhere (no FP8 tensor cores, the interpreter): small blocks — the interpreter is slow per program
FALLBACK_CONFIG = AttnConfig(block_m=64, block_n=64, num_warps=4, num_stages=2)
# what the benchmark's sweep times (BLOCK_N 256 with 3+ stages needs more shared memory than Hopper has: left out)
# (Triton's attention tutorial leaves out 8 warps for blocks smaller than 128×128 on Hopper; so do we.)
SWEEP_CONFIGS = tuple(AttnConfig(*c) for c in (  # block_m, block_n, num_warps, num_stages, tma, fast_acc, exp16
    (128, 128, 8, 2, False, False), (128, 128, 8, 3, False, False), (128, 128, 8, 4, False, False),
    (128, 128, 4, 3, False, False), (64, 128, 4, 3, False, False), (64, 128, 4, 4, False, False),
    (128, 64, 4, 3, False, False), (128, 64, 4, 4, False, False), (64, 64, 4, 3, False, False),
    (128, 256, 8, 2, False, False),
    (128, 128, 8, 2, True, False), (128, 128, 8, 3, True, False), (128, 128, 8, 4, True, False),
    (64, 128, 4, 3, True, False), (128, 64, 4, 3, True, False),
    (128, 128, 8, 3, False, True), (128, 128, 8, 3, True, True),
    (128, 128, 8, 3, False, False, True), (128, 128, 8, 2, True, False, True), (128, 128, 8, 3, True, False, True),
    (128, 128, 8, 3, True, True, True)))


class Prepared(NamedTuple):
    """The kernel's operands. qq [BH, Lqp, D], kq [BH, Lkp, D], vq [BH, D, Lkp] (e4m3, zero-padded);
    qs [BH, Lqp/BM], ks [BH, Lkp/BN], vs [BH, D] (fp32 scales)."""
    qq: torch.Tensor
    qs: torch.Tensor
    kq: torch.Tensor
    ks: torch.Tensor
    vq: torch.Tensor
    vs: torch.Tensor


def _key_mean(k: torch.Tensor) -> torch.Tensor:
    """[B, L, H, D] -> fp32 [B·H, D]: the keys' mean over the tokens, one read of k."""
    b, _, h, d = k.shape
    return k.mean(dim=1, dtype=torch.float32).reshape(b * h, d).contiguous()  # [BH, D]


def _value_scale(v: torch.Tensor) -> torch.Tensor:
    """[B, L, H, D] -> fp32 [B·H, D]: amax over the tokens / 448 per head and channel (1 for an all-zero channel)."""
    b, _, h, d = v.shape
    lo, hi = torch.aminmax(v, dim=1)  # 2 × [B, H, D]: one read of v, no |v| copy
    amax = torch.maximum(-lo, hi).float().reshape(b * h, d)  # [BH, D]
    return torch.where(amax > 0, amax * INV_E4M3_MAX, torch.ones_like(amax)).contiguous()


def _pad_to(n: int, block: int) -> int:
    return -(-n // block) * block


def prepare_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: AttnConfig) -> Prepared:
    """The eager pre-pass, over fp32 copies: the reference `prepare` is tested equal to."""
    b, lq, h, d = q.shape
    lk = k.shape[1]

    def heads_first(t, n_pad):  # [B, L, H, D] -> fp32 [BH, Lp, D], zero rows appended
        t = t.float().transpose(1, 2).reshape(b * h, t.shape[1], d)
        return torch.nn.functional.pad(t, (0, 0, 0, n_pad - t.shape[1]))

    def per_block(x, block):  # fp32 [BH, Lp, D] -> e4m3 [BH, Lp, D], [BH, Lp/block]
        xb = x.view(b * h, -1, block, d)  # [BH, nb, block, D]
        amax = xb.abs().amax(dim=(2, 3))  # [BH, nb]
        scale = torch.where(amax > 0, amax * INV_E4M3_MAX, torch.ones_like(amax))
        xq = (xb / scale[:, :, None, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
        return xq.reshape(x.shape), scale

    lqp, lkp = _pad_to(lq, cfg.block_m), _pad_to(lk, cfg.block_n)
    qq, qs = per_block(heads_first(q, lqp), cfg.block_m)
    kc = heads_first(k, lkp) - _key_mean(k)[:, None, :]  # [BH, Lkp, D]
    kc[:, lk:] = 0  # padding stays zero
    kq, ks = per_block(kc, cfg.block_n)
    vs = _value_scale(v)  # [BH, D]
    vq = (heads_first(v, lkp) / vs[:, None, :]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)  # [BH, Lkp, D]
    return Prepared(qq, qs, kq, ks, vq.transpose(1, 2).contiguous(), vs)


if HAVE_TRITON:

    @triton.jit
    def _quantize_block_kernel(x_ptr, mean_ptr, out_ptr, scale_ptr, n_tokens, n_heads, stride_b, stride_l,
                               stride_h, n_blocks, l_pad, D: tl.constexpr, BLOCK: tl.constexpr,
                               CENTRE: tl.constexpr):
        """One block of BLOCK tokens of one head: [B, L, H, D] in -> e4m3 [BH, Lp, D] + one fp32 scale."""
        blk = tl.program_id(0)
        bh = tl.program_id(1)
        rl = blk * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] token rows
        rd = tl.arange(0, D)
        row_ok = (rl < n_tokens)[:, None]
        base = (bh // n_heads).to(tl.int64) * stride_b + (bh % n_heads).to(tl.int64) * stride_h
        x = tl.load(x_ptr + base + rl[:, None].to(tl.int64) * stride_l + rd[None, :], mask=row_ok, other=0.0)
        x = x.to(tl.float32)  # [BLOCK, D]
        if CENTRE:  # K smoothing; padded rows stay zero
            x = tl.where(row_ok, x - tl.load(mean_ptr + bh * D + rd)[None, :], 0.0)
        amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
        scale = tl.where(amax > 0, amax * INV_E4M3_MAX_TL, 1.0)  # as the eager twin (kernels/fp8.py INV_E4M3_MAX)
        xq = tl.math.div_rn(x, tl.zeros([BLOCK, D], tl.float32) + scale)  # IEEE division, as the eager twin
        xq = round_to_e4m3(tl.minimum(tl.maximum(xq, -448.0), 448.0))
        out = out_ptr + bh.to(tl.int64) * l_pad * D
        tl.store(out + rl[:, None] * D + rd[None, :], xq.to(tl.float8e4nv))
        tl.store(scale_ptr + bh * n_blocks + blk, scale)

    @triton.jit
    def _quantize_v_kernel(x_ptr, scale_ptr, out_ptr, n_tokens, n_heads, stride_b, stride_l, stride_h, l_pad,
                           D: tl.constexpr, BLOCK: tl.constexpr):
        """One block of tokens of one head of V, per-channel scales: [B, L, H, D] in -> e4m3 [BH, D, Lp]."""
        blk = tl.program_id(0)
        bh = tl.program_id(1)
        rl = blk * BLOCK + tl.arange(0, BLOCK)
        rd = tl.arange(0, D)
        row_ok = (rl < n_tokens)[:, None]
        base = (bh // n_heads).to(tl.int64) * stride_b + (bh % n_heads).to(tl.int64) * stride_h
        x = tl.load(x_ptr + base + rl[:, None].to(tl.int64) * stride_l + rd[None, :], mask=row_ok, other=0.0)
        x = x.to(tl.float32)  # [BLOCK, D]
        scale = tl.load(scale_ptr + bh * D + rd)  # [D]
        xq = tl.math.div_rn(x, tl.zeros([BLOCK, D], tl.float32) + scale[None, :])
        xq = round_to_e4m3(tl.minimum(tl.maximum(xq, -448.0), 448.0))
        out = out_ptr + bh.to(tl.int64) * D * l_pad
        tl.store(out + rd[None, :] * l_pad + rl[:, None], xq.to(tl.float8e4nv))  # transposed: [D, Lp]

    @triton.jit
    def _attn_step(j, acc, l_i, m_i, q, k_src, v_src, k_row0, v_row0, ks_base, q_scale, n_kv, lk_pad,
                   D: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, UPCAST: tl.constexpr,
                   ROUND_P: tl.constexpr, TMA: tl.constexpr, FAST_ACC: tl.constexpr, EXP16: tl.constexpr):
        """Key block j. k_src / v_src: this head's K and Vᵀ base pointers, or (TMA) descriptors of all heads with
        this head's first row k_row0 / v_row0."""
        rd = tl.arange(0, D)
        rn = j * BLOCK_N + tl.arange(0, BLOCK_N)
        if TMA:
            k = k_src.load([k_row0 + j * BLOCK_N, 0])  # [BN, D] e4m3
        else:
            k = tl.load(k_src + rn[:, None] * D + rd[None, :])  # [BN, D] e4m3
        if UPCAST:
            k = k.to(tl.float32)
        c = tl.load(ks_base + j) * q_scale  # s_Q·s_K·log2(e)/√D
        qk = tl.dot(q, tl.trans(k))  # [BM, BN] fp32
        if MASK:  # only the last, partly filled block
            qk = tl.where((rn < n_kv)[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * c)  # c > 0: max(c·qk) = c·max(qk)
        alpha = tl.math.exp2(m_i - m_new)
        # 2^(c·qk − m + log2 448) ∈ [0, 448]: the 448 that fills e4m3's range cancels in acc / l
        arg = qk * c - (m_new - 8.807354922057604)[:, None]  # [BM, BN] fp32, ≤ log2 448
        if EXP16:
            p = tl.inline_asm_elementwise("ex2.approx.f16x2 $0, $1;", "=r,r", [arg.to(tl.float16)],
                                          dtype=tl.float16, is_pure=True, pack=2)  # [BM, BN] f16
            if BLOCK_N * 448 <= 65504:  # a block's row sum fits f16: no conversion of every element to fp32
                l_i = l_i * alpha + tl.sum(p, 1).to(tl.float32)
            else:
                l_i = l_i * alpha + tl.sum(p.to(tl.float32), 1)
        else:
            p = tl.math.exp2(arg)  # [BM, BN] fp32
            l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if TMA:
            v = tl.trans(v_src.load([v_row0, j * BLOCK_N]))  # [D, BN] tile -> [BN, D] e4m3, keys contiguous
        else:
            v = tl.load(v_src + rd[None, :] * lk_pad + rn[:, None])  # [BN, D] e4m3 (stored [D, Lkp])
        if ROUND_P:  # the interpreter's fp8 cast is wrong (kernels/fp8.py: round_to_e4m3)
            p = round_to_e4m3(p.to(tl.float32))
        p8 = p.to(tl.float8e4nv)
        if UPCAST:
            p8 = p8.to(tl.float32)
            v = v.to(tl.float32)
        if FAST_ACC:
            acc = tl.dot(p8, v, acc)  # [BM, D] accumulated in place, in the tensor cores' precision
        else:
            acc = tl.dot(p8, v, acc, max_num_imprecise_acc=BLOCK_N)  # [BM, D], promoted to fp32 once per block
        return acc, l_i, m_new

    @triton.jit
    def _attn_blocks(acc, l_i, m_i, q, k_src, v_src, k_row0, v_row0, ks_base, q_scale, j_lo, j_hi, n_kv, lk_pad,
                     D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
                     UPCAST: tl.constexpr, ROUND_P: tl.constexpr, TMA: tl.constexpr, FAST_ACC: tl.constexpr,
                     EXP16: tl.constexpr):
        # (Triton 3.9's automatic warp specialisation, tl.range(warp_specialize=True), compiled for sm_90 left this
        # loop unchanged at 8 warps and failed in its Hopper pass at 4: not offered)
        for j in range(j_lo, j_hi):
            acc, l_i, m_i = _attn_step(j, acc, l_i, m_i, q, k_src, v_src, k_row0, v_row0, ks_base, q_scale, n_kv,
                                       lk_pad, D, BLOCK_N, MASK, UPCAST, ROUND_P, TMA, FAST_ACC, EXP16)
        return acc, l_i, m_i

    @triton.jit
    def _fp8_attn_fwd(q_ptr, k_ptr, v_ptr, qs_ptr, ks_ptr, vs_ptr, o_ptr, n_q, n_kv, n_heads, n_q_blocks,
                      n_kv_blocks, n_full_blocks, lq_pad, lk_pad, sm_scale_log2, o_stride_b, o_stride_l, o_stride_h,
                      D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
                      ROUND_P: tl.constexpr, TMA: tl.constexpr, FAST_ACC: tl.constexpr, EXP16: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        bh64 = bh.to(tl.int64)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows of this program
        rd = tl.arange(0, D)
        if TMA:  # q_ptr, k_ptr, v_ptr are descriptors of [BH·Lqp, D], [BH·Lkp, D], [BH·D, Lkp]
            q = q_ptr.load([bh * lq_pad + pid_m * BLOCK_M, 0])  # [BM, D] e4m3
            k_src = k_ptr
            v_src = v_ptr
        else:
            q = tl.load(q_ptr + bh64 * lq_pad * D + rm[:, None] * D + rd[None, :])  # [BM, D] e4m3
            k_src = k_ptr + bh64 * lk_pad * D
            v_src = v_ptr + bh64 * D * lk_pad
        if UPCAST:
            q = q.to(tl.float32)
        q_scale = tl.load(qs_ptr + bh * n_q_blocks + pid_m) * sm_scale_log2
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        ks_base = ks_ptr + bh * n_kv_blocks
        k_row0 = bh * lk_pad
        v_row0 = bh * D
        # the full key blocks, unmasked; then the partly filled last one (if any), masked
        acc, l_i, m_i = _attn_blocks(acc, l_i, m_i, q, k_src, v_src, k_row0, v_row0, ks_base, q_scale, 0,
                                     n_full_blocks, n_kv, lk_pad, D, BLOCK_M, BLOCK_N, False, UPCAST, ROUND_P, TMA,
                                     FAST_ACC, EXP16)
        acc, l_i, m_i = _attn_blocks(acc, l_i, m_i, q, k_src, v_src, k_row0, v_row0, ks_base, q_scale,
                                     n_full_blocks, n_kv_blocks, n_kv, lk_pad, D, BLOCK_M, BLOCK_N, True, UPCAST,
                                     ROUND_P, TMA, FAST_ACC, EXP16)
        v_scale = tl.load(vs_ptr + bh * D + rd)  # [D]
        out = acc * (v_scale[None, :] / l_i[:, None])  # [BM, D]
        o = o_ptr + (bh // n_heads).to(tl.int64) * o_stride_b + (bh % n_heads).to(tl.int64) * o_stride_h
        tl.store(o + rm[:, None].to(tl.int64) * o_stride_l + rd[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=(rm < n_q)[:, None])


def _need_triton():
    if not HAVE_TRITON:
        raise RuntimeError("attention backend 'fp8_triton' needs triton: pip install triton (it comes with CUDA torch)")


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"fp8_triton attention takes q [B, Lq, H, D] and k, v [B, Lk, H, D]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[-1] not in (16, 32, 64, 128, 256):
        raise ValueError(f"fp8_triton attention takes head dims 16..256 (powers of two), got {q.shape[-1]}")
    if k.shape[1] == 0:
        raise ValueError("fp8_triton attention: no keys (Lk = 0)")


def prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: AttnConfig) -> Prepared:
    """The fused pre-pass: one Triton kernel per tensor (plus K's mean and V's amax, one torch reduction each)."""
    _need_triton()
    b, lq, h, d = q.shape
    lk = k.shape[1]
    lqp, lkp = _pad_to(lq, cfg.block_m), _pad_to(lk, cfg.block_n)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    dev = q.device
    qq = torch.empty(b * h, lqp, d, dtype=E4M3, device=dev)  # [BH, Lqp, D]
    kq = torch.empty(b * h, lkp, d, dtype=E4M3, device=dev)  # [BH, Lkp, D]
    vq = torch.empty(b * h, d, lkp, dtype=E4M3, device=dev)  # [BH, D, Lkp]
    qs = torch.empty(b * h, lqp // cfg.block_m, dtype=torch.float32, device=dev)
    ks = torch.empty(b * h, lkp // cfg.block_n, dtype=torch.float32, device=dev)
    k_mean = _key_mean(k)  # [BH, D]
    vs = _value_scale(v)  # [BH, D]
    # ~64 fp32 values a thread: 8 warps for 128×128 blocks (4 would spill)
    launch = {"num_warps": 8 if max(cfg.block_m, cfg.block_n) * d >= 16384 else 4} if q.is_cuda else {}
    _quantize_block_kernel[(qs.shape[1], b * h)](q, qs, qq, qs, lq, h, q.stride(0), q.stride(1), q.stride(2),
                                                 qs.shape[1], lqp, D=d, BLOCK=cfg.block_m, CENTRE=False, **launch)
    _quantize_block_kernel[(ks.shape[1], b * h)](k, k_mean, kq, ks, lk, h, k.stride(0), k.stride(1), k.stride(2),
                                                 ks.shape[1], lkp, D=d, BLOCK=cfg.block_n, CENTRE=True, **launch)
    _quantize_v_kernel[(ks.shape[1], b * h)](v, vs, vq, lk, h, v.stride(0), v.stride(1), v.stride(2), lkp,
                                             D=d, BLOCK=cfg.block_n, **launch)
    return Prepared(qq, qs, kq, ks, vq, vs)


def default_config(device: torch.device) -> AttnConfig:
    """HOPPER_CONFIG on Hopper and later; on Ada (FP8 tensor cores, no TMA) the same without TMA."""
    cap = torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)
    if cap >= (9, 0):
        return HOPPER_CONFIG
    if cap >= (8, 9):
        return AttnConfig(HOPPER_CONFIG.block_m, HOPPER_CONFIG.block_n, HOPPER_CONFIG.num_warps,
                          HOPPER_CONFIG.num_stages, False, HOPPER_CONFIG.fast_acc, HOPPER_CONFIG.exp16)
    return FALLBACK_CONFIG


def attend(p: Prepared, out: torch.Tensor, n_kv: int, cfg: AttnConfig, upcast: bool) -> torch.Tensor:
    """The attention kernel on prepared operands; writes out [B, Lq, H, D] (any float dtype) and returns it."""
    _need_triton()
    b, lq, h, d = out.shape
    n_kv_blocks = p.ks.shape[1]
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    launch = cfg.launch() if out.is_cuda else {}
    grid = (p.qs.shape[1], b * h)
    srcs = (p.qq, p.kq, p.vq)
    if cfg.tma:  # 2-D views of all heads; the kernel offsets rows by head
        if TensorDescriptor is None:
            raise RuntimeError("fp8_triton: tma=True needs triton.tools.tensor_descriptor (Triton ≥ 3.4)")
        srcs = (TensorDescriptor.from_tensor(p.qq.view(-1, d), [cfg.block_m, d]),
                TensorDescriptor.from_tensor(p.kq.view(-1, d), [cfg.block_n, d]),
                TensorDescriptor.from_tensor(p.vq.view(-1, p.vq.shape[2]), [d, cfg.block_n]))
    _fp8_attn_fwd[grid](*srcs, p.qs, p.ks, p.vs, out, lq, n_kv, h, p.qs.shape[1], n_kv_blocks,
                        n_kv // cfg.block_n, p.qq.shape[1], p.kq.shape[1], math.log2(math.e) / math.sqrt(d),
                        out.stride(0), out.stride(1), out.stride(2),
                        D=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, UPCAST=bool(upcast),
                        ROUND_P=interpreting, TMA=cfg.tma, FAST_ACC=cfg.fast_acc,
                        EXP16=cfg.exp16 and not interpreting and out.is_cuda,
                        **launch)
    return out


def fp8_attention_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: AttnConfig | None = None,
                       upcast: bool | None = None) -> torch.Tensor:
    """The pre-pass and the kernel with an explicit config (the benchmark's entry point)."""
    _need_triton()
    _check_shapes(q, k, v)
    cfg = cfg or default_config(q.device)
    if upcast is None:
        upcast = not (q.is_cuda and torch.cuda.get_device_capability(q.device) >= (8, 9))
    out = torch.empty_like(q, memory_format=torch.contiguous_format)  # [B, Lq, H, D]
    return attend(prepare(q, k, v, cfg), out, k.shape[1], cfg, upcast)


@torch.library.custom_op("wanrender::fp8_attention", mutates_args=())
def _fp8_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_m: int, block_n: int,
                      num_warps: int, num_stages: int, tma: bool, fast_acc: bool, exp16: bool,
                      upcast: int) -> torch.Tensor:
    cfg = AttnConfig(block_m, block_n, num_warps, num_stages, tma, fast_acc, exp16)
    return fp8_attention_impl(q, k, v, cfg, None if upcast < 0 else bool(upcast))


@_fp8_attention_op.register_fake
def _(q, k, v, block_m, block_n, num_warps, num_stages, tma, fast_acc, exp16, upcast):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_m: int | None = None,
                  block_n: int | None = None, upcast: bool | None = None) -> torch.Tensor:
    """Softmax attention with FP8 operands. q: [B, Lq, H, D], k and v: [B, Lk, H, D] -> [B, Lq, H, D] in q's dtype.

    A torch custom op (wanrender::fp8_attention): inside a compiled DiT block it is one opaque node, no graph break.
    upcast=None: fp8 tl.dot where the GPU has FP8 tensor cores (capability ≥ 8.9), upcast otherwise (and in the
    interpreter). Blocks and launch: HOPPER_CONFIG on such a GPU, FALLBACK_CONFIG elsewhere; block_m / block_n
    override its blocks."""
    _need_triton()
    _check_shapes(q, k, v)
    cfg = default_config(q.device)
    return _fp8_attention_op(q, k, v, block_m or cfg.block_m, block_n or cfg.block_n, cfg.num_warps,
                             cfg.num_stages, cfg.tma, cfg.fast_acc, cfg.exp16, -1 if upcast is None else int(upcast))
