"""Triton kernels behind kernels/fused.py. Imported only where triton is installed (the GPU machines).

Every kernel is one program per token row of a contiguous [B·L, D] tensor with the whole row in registers
(BLOCK = next power of two of the row), fp32 arithmetic, and the same rounding points as the plain versions in
kernels/fused.py. Per-row operands that broadcast over tokens (modulation rows [B, 1, D], or [B, L, D] per token)
are addressed through their (batch, token) strides, 0 where broadcast, so they are never expanded in memory.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl


def _num_warps(block: int) -> int:
    # ~16-32 elements per thread: enough loads in flight without spilling a 8192-wide fp32 row
    return max(4, min(16, block // 512))


@triton.jit
def _rms_norm_rope_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, L, eps,
                          D: tl.constexpr, HALF_DH: tl.constexpr, BLOCK: tl.constexpr, HAS_ROPE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # one program per token: row = b·L + l
    i = tl.arange(0, BLOCK)  # pair index: the row's elements 2i (real part) and 2i+1 (imaginary part)
    m = i < D // 2
    base = row * D
    xe = tl.load(x_ptr + base + 2 * i, mask=m, other=0.0).to(tl.float32)  # [BLOCK]
    xo = tl.load(x_ptr + base + 2 * i + 1, mask=m, other=0.0).to(tl.float32)  # [BLOCK]
    ss = tl.sum(xe * xe, axis=0) + tl.sum(xo * xo, axis=0)
    r = tl.rsqrt(ss / D + eps)
    we = tl.load(w_ptr + 2 * i, mask=m, other=0.0).to(tl.float32)  # weight already in x's dtype
    wo = tl.load(w_ptr + 2 * i + 1, mask=m, other=0.0).to(tl.float32)
    odt = out_ptr.dtype.element_ty
    # the reference rounds the normalised x to x's dtype, multiplies by the weight, rounds again
    ye = ((xe * r).to(odt).to(tl.float32) * we).to(odt).to(tl.float32)
    yo = ((xo * r).to(odt).to(tl.float32) * wo).to(odt).to(tl.float32)
    if HAS_ROPE:
        tok = row % L  # the RoPE table has one row per token, shared by the batch and the heads
        j = i % HALF_DH  # pair index within the head
        c = tl.load(cos_ptr + tok * HALF_DH + j, mask=m, other=0.0)  # fp32
        s = tl.load(sin_ptr + tok * HALF_DH + j, mask=m, other=0.0)
        oe = ye * c - yo * s
        oo = ye * s + yo * c
    else:
        oe = ye
        oo = yo
    tl.store(out_ptr + base + 2 * i, oe.to(odt), mask=m)
    tl.store(out_ptr + base + 2 * i + 1, oo.to(odt), mask=m)


@triton.jit
def _ln_modulate_kernel(x_ptr, shift_ptr, scale_ptr, out_ptr, L, sh_sb, sh_sl, sc_sb, sc_sl, eps,
                        D: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row // L
    l = row % L
    cols = tl.arange(0, BLOCK)
    m = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=m, other=0.0).to(tl.float32)  # [BLOCK]
    mean = tl.sum(x, axis=0) / D
    diff = tl.where(m, x - mean, 0.0)  # padding lanes must not enter the variance
    var = tl.sum(diff * diff, axis=0) / D
    rstd = tl.rsqrt(var + eps)
    sh = tl.load(shift_ptr + b * sh_sb + l * sh_sl + cols, mask=m, other=0.0).to(tl.float32)
    sc = tl.load(scale_ptr + b * sc_sb + l * sc_sl + cols, mask=m, other=0.0).to(tl.float32)
    y = (diff * rstd) * (1.0 + sc) + sh
    tl.store(out_ptr + row * D + cols, y.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _gated_residual_kernel(x_ptr, y_ptr, g_ptr, out_ptr, L, g_sb, g_sl,
                           D: tl.constexpr, BLOCK: tl.constexpr, HAS_GATE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=m, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + row * D + cols, mask=m, other=0.0).to(tl.float32)
    if HAS_GATE:
        b = row // L
        l = row % L
        g = tl.load(g_ptr + b * g_sb + l * g_sl + cols, mask=m, other=0.0).to(tl.float32)
        out = x + y * g
    else:
        out = x + y
    tl.store(out_ptr + row * D + cols, out, mask=m)


def _on(x: torch.Tensor):
    # launch on x's GPU whatever the current device is; CPU tensors only occur under TRITON_INTERPRET=1 (tests)
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _row_strides(t: torch.Tensor, b: int, l: int, d: int) -> tuple[torch.Tensor, int, int]:
    """A [B, 1|L, D] operand as (tensor, batch stride, token stride) with stride 0 where it broadcasts."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    e = t.expand(b, l, d)  # a view: broadcast dims get stride 0
    return t, e.stride(0), e.stride(1)


def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                  eps: float) -> torch.Tensor:
    """x: [B, L, D]; weight: [D]; cos/sin: [L, Dh/2] fp32 or None -> [B, L, D] in x's dtype."""
    b, l, d = x.shape
    x = x.contiguous()
    w = weight.to(x.dtype).contiguous()  # the reference multiplies by the weight in x's dtype
    out = torch.empty_like(x)  # [B, L, D]
    has_rope = cos is not None
    if has_rope:
        if cos.shape[0] != l or d % (2 * cos.shape[1]):
            raise ValueError(f"RoPE table {tuple(cos.shape)} does not fit tokens {tuple(x.shape)}")
        cos, sin = cos.float().contiguous(), sin.float().contiguous()  # [L, Dh/2]
        half_dh = cos.shape[1]
    else:
        cos = sin = w  # unused placeholders: a kernel argument must be a tensor
        half_dh = 1
    block = triton.next_power_of_2(d // 2)
    with _on(x):
        _rms_norm_rope_kernel[(b * l,)](x, w, cos, sin, out, l, float(eps), D=d, HALF_DH=half_dh, BLOCK=block,
                                        HAS_ROPE=has_rope, num_warps=_num_warps(block))
    return out


def ln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                out_dtype: torch.dtype) -> torch.Tensor:
    """x: [B, L, D] fp32; shift/scale: [B, 1|L, D] -> LN(x)·(1 + scale) + shift as [B, L, D] out_dtype."""
    b, l, d = x.shape
    x = x.contiguous()
    shift, sh_sb, sh_sl = _row_strides(shift, b, l, d)
    scale, sc_sb, sc_sl = _row_strides(scale, b, l, d)
    out = torch.empty((b, l, d), dtype=out_dtype, device=x.device)  # [B, L, D]
    block = triton.next_power_of_2(d)
    with _on(x):
        _ln_modulate_kernel[(b * l,)](x, shift, scale, out, l, sh_sb, sh_sl, sc_sb, sc_sl, float(eps), D=d,
                                      BLOCK=block, num_warps=_num_warps(block))
    return out


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """x: [B, L, D] fp32; y: [B, L, D]; gate: [B, 1|L, D] or None -> x + y·gate as [B, L, D] fp32."""
    b, l, d = x.shape
    x, y = x.contiguous(), y.contiguous()
    if gate is not None:
        gate, g_sb, g_sl = _row_strides(gate, b, l, d)
    else:
        gate, g_sb, g_sl = x, 0, 0  # placeholder, never read
    out = torch.empty((b, l, d), dtype=torch.float32, device=x.device)  # [B, L, D]
    block = triton.next_power_of_2(d)
    with _on(x):
        _gated_residual_kernel[(b * l,)](x, y, gate, out, l, g_sb, g_sl, D=d, BLOCK=block,
                                         HAS_GATE=gate is not x, num_warps=_num_warps(block))
    return out
