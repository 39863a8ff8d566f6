"""FP8 attention: our own Triton kernel (FP8 QKᵀ and PV with per-block scales, online softmax). LOSSY.

    per (batch·head, block of BLOCK_M queries):
      S_j   = (Q_q · K_qjᵀ) · s_Q · s_Kj · log2(e)/√D          e4m3 × e4m3 -> fp32 accumulate     [BM, BN]
      m     = max(m, rowmax S_j);  P = 2^(S_j − m) ∈ [0, 1];  l = l·α + ΣP
      acc   = acc·α + (round_e4m3(P·448) · V_qj) · s_Vj / 448   e4m3 × e4m3 -> fp32 accumulate     [BM, D]
    out = acc / l

Scales: one per block of BLOCK_M query rows (Q) and per block of BLOCK_N key rows (K, V), per head, computed by
`quantize_blocks` in a pre-pass; P needs no computed scale (it lies in [0, 1] after the online-softmax shift, so
a fixed 448 uses e4m3's range). The method is that of FlashAttention-3's FP8 path and SageAttention (block
scales, fp32 softmax) with SageAttention's K smoothing (keys centred on their mean); the code is ours.

The backend is lossy (relative error ~ 2⁻⁴-ish per operand, ~3 % of the output RMS on random inputs): it is
registered in kernels/attention.py under "fp8_triton" and listed as available only where settings allow lossy
kernels, so the "auto" autotune never measures or picks it. Tested under TRITON_INTERPRET=1 on a CPU against
plain attention (tests/test_fp8.py, bound stated there); where the GPU has no FP8 tensor cores (or in the
interpreter with emulate=True) the fp8 operands are upcast before tl.dot — the same quantised values.
"""
from __future__ import annotations

import math

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0

try:  # triton is optional: the GPU machines have it; CI installs it for the interpreter test
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    HAVE_TRITON = False


def quantize_blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [BH, L, D] -> (e4m3 [BH, Lp, D] with L padded to a multiple of `block`, fp32 scales [BH, Lp/block])."""
    bh, n, d = x.shape
    lp = -(-n // block) * block
    if lp != n:
        x = torch.nn.functional.pad(x, (0, 0, 0, lp - n))  # [BH, Lp, D], zero rows
    xb = x.float().view(bh, lp // block, block, d)  # [BH, nb, block, D]
    amax = xb.abs().amax(dim=(2, 3))  # [BH, nb]
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))  # [BH, nb]
    q = (xb / scale[:, :, None, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)  # [BH, nb, block, D]
    # elementwise ops keep a strided input's layout: the kernel indexes a dense [BH, Lp, D]
    return q.reshape(bh, lp, d).contiguous(), scale.contiguous()


if HAVE_TRITON:

    @triton.jit
    def _fp8_attn_fwd(q_ptr, k_ptr, v_ptr, qs_ptr, ks_ptr, vs_ptr, o_ptr, n_kv, n_q_blocks, n_kv_blocks,
                      lq_pad, lk_pad, sm_scale_log2, out_stride_bh, out_stride_l,
                      D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows of this program
        rd = tl.arange(0, D)
        q = tl.load(q_ptr + bh * lq_pad * D + rm[:, None] * D + rd[None, :])  # [BM, D] e4m3
        if UPCAST:
            q = q.to(tl.float32)
        q_scale = tl.load(qs_ptr + bh * n_q_blocks + pid_m) * sm_scale_log2
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        for j in range(0, n_kv_blocks):
            rn = j * BLOCK_N + tl.arange(0, BLOCK_N)
            k = tl.load(k_ptr + bh * lk_pad * D + rn[:, None] * D + rd[None, :])  # [BN, D] e4m3
            # V is stored transposed, [BH, D, Lkp]: the PV product's B operand must be K-major (contiguous along
            # the keys) for Hopper's FP8 wgmma, as in Triton's fused-attention tutorial
            v = tl.load(v_ptr + bh * lk_pad * D + rd[None, :] * lk_pad + rn[:, None])  # [BN, D] e4m3
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            k_scale = tl.load(ks_ptr + bh * n_kv_blocks + j)
            v_scale = tl.load(vs_ptr + bh * n_kv_blocks + j)
            s = tl.dot(q, tl.trans(k)) * (q_scale * k_scale)  # [BM, BN] fp32, log2 units
            s = tl.where((rn < n_kv)[None, :], s, float("-inf"))  # padded keys
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(s - m_new[:, None])  # [BM, BN] in [0, 1]
            l_i = l_i * alpha + tl.sum(p, 1)
            p8 = (p * 448.0).to(tl.float8e4nv)  # P in e4m3, fixed scale 448
            if UPCAST:
                p8 = p8.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p8, v) * (v_scale / 448.0)  # [BM, D]
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(o_ptr + bh * out_stride_bh + rm[:, None] * out_stride_l + rd[None, :], out)


@torch.compiler.disable  # run eagerly inside compiled blocks: a graph break here, never a trace of the launch
def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_m: int | None = None,
                  block_n: int | None = None, upcast: bool | None = None) -> torch.Tensor:
    """Softmax attention with FP8 operands. q: [B, Lq, H, D], k and v: [B, Lk, H, D] -> [B, Lq, H, D] in q's dtype.

    upcast=None: fp8 tl.dot where the GPU has FP8 tensor cores (capability ≥ 8.9), upcast otherwise (and in the
    interpreter). Blocks: 128×128 with 8 warps on a GPU (the Hopper configuration of Triton's attention tutorial),
    64×64 elsewhere (the interpreter is slow per program, not per element)."""
    if not HAVE_TRITON:
        raise RuntimeError("attention backend 'fp8_triton' needs triton: pip install triton (it comes with CUDA torch)")
    b, lq, h, d = q.shape
    lk = k.shape[1]
    if d not in (16, 32, 64, 128, 256):
        raise ValueError(f"fp8_triton attention takes head dims 16..256 (powers of two), got {d}")
    if upcast is None:
        upcast = not (q.is_cuda and torch.cuda.get_device_capability(q.device) >= (8, 9))
    block_m = block_m or (128 if q.is_cuda else 64)
    block_n = block_n or (128 if q.is_cuda else 64)
    launch = {"num_warps": 8, "num_stages": 3} if q.is_cuda else {}
    heads_first = [t.transpose(1, 2).reshape(b * h, t.shape[1], d).contiguous() for t in (q, k, v)]  # 3 × [BH, L, D]
    # K smoothing (SageAttention): subtracting the keys' mean over the tokens adds q·mean to every score of a
    # query row, which softmax ignores — but it centres K, so its e4m3 blocks lose less (error 0.09 -> 0.07)
    k_centred = heads_first[1] - heads_first[1].float().mean(dim=1, keepdim=True).to(k.dtype)  # [BH, Lk, D]
    qq, qs = quantize_blocks(heads_first[0], block_m)  # [BH, Lqp, D], [BH, nq]
    kq, ks = quantize_blocks(k_centred, block_n)  # [BH, Lkp, D], [BH, nk]
    vq, vs = quantize_blocks(heads_first[2], block_n)  # [BH, Lkp, D], [BH, nk]
    vq = vq.transpose(1, 2).contiguous()  # [BH, D, Lkp]: K-major for the PV product
    out = torch.empty(b * h, qq.shape[1], d, device=q.device, dtype=torch.float32)  # [BH, Lqp, D]
    grid = (qq.shape[1] // block_m, b * h)
    _fp8_attn_fwd[grid](qq, kq, vq, qs, ks, vs, out, lk, qs.shape[1], ks.shape[1], qq.shape[1], kq.shape[1],
                        math.log2(math.e) / math.sqrt(d), out.stride(0), out.stride(1),
                        D=d, BLOCK_M=block_m, BLOCK_N=block_n, UPCAST=bool(upcast), **launch)
    out = out[:, :lq].view(b, h, lq, d).transpose(1, 2)  # [B, Lq, H, D]
    return out.to(q.dtype)
