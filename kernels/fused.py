"""Fused kernels for what sits between the matmuls and the attention in a DiT block.

Three operations, each a memory-bound pass over [B, L, D] (75,600 × 5120 at 720p) that eager PyTorch spreads over
several kernels and several round trips through device memory:

  rms_norm_rope   q/k RMSNorm over the model dim, then the 3D RoPE on each head      (bf16 in, bf16 out)
  ln_modulate     LayerNorm(x)·(1 + scale) + shift in fp32                            (fp32 in, bf16 out)
  gated_residual  x + y·gate (gate optional)                                          (fp32 + bf16 -> fp32)

Each has a plain-PyTorch version (`*_plain`): the CPU path, and the exact math of the reference model, rounding
steps included, so the diffusers parity of renderer/families/wan22/model.py does not move. The dispatchers (no
suffix) run the Triton kernels (kernels/fused_triton.py) only on CUDA tensors when triton imports and the caller's
`fused` flag (the pipeline's KernelSettings.fused, held by each block) is on. The Triton launches are wrapped as
torch custom ops, so torch.compile treats them as single opaque ops instead of tracing Triton's launcher.
"""
from __future__ import annotations

import importlib.util
import logging
from typing import Optional

import torch
import torch.nn.functional as F

log = logging.getLogger("wanrender.fused")
HAS_TRITON = importlib.util.find_spec("triton") is not None
_triton_failed: str | None = None  # set when a Triton launch raised: later calls run the plain math


def _use_triton(x: torch.Tensor, fused: bool) -> bool:
    # the kernels take token rows [B, L, D]; anything else takes the plain path
    return fused and HAS_TRITON and x.is_cuda and x.dim() == 3


def fused_active(device: torch.device | str, fused: bool = True) -> bool:
    """Whether the dispatchers given `fused` (the pipeline's KernelSettings.fused) run Triton on this device."""
    return fused and HAS_TRITON and _triton_failed is None and torch.device(device).type == "cuda"


def triton_failure() -> str | None:
    """The error that turned the Triton kernels off in this process, if any (for the run log)."""
    return _triton_failed


def _run_triton(name: str, plain, *args):
    """Launch kernels/fused_triton.<name>; if Triton fails (a compiler or driver problem on a new machine), say so
    once, loudly, and run the plain math from then on: a render is slower, never lost. The GPU tests call
    kernels/fused_triton directly, so a failure there is not hidden."""
    global _triton_failed
    if _triton_failed is None:
        try:
            from kernels import fused_triton

            return getattr(fused_triton, name)(*args)
        except Exception as e:  # noqa: BLE001 - any Triton failure must leave the plain path working
            _triton_failed = f"{name}: {type(e).__name__}: {e}"
            log.warning("Triton kernel %s failed, using the plain PyTorch path from now on: %s", name, e)
    return plain(*args)


# ------------------------------------------------------------------------------------------------------------
# plain versions: the reference math


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of x. x: [B, L, Hn, Dh]; cos/sin: [L, Dh/2] -> [B, L, Hn, Dh] in x's dtype."""
    xr, xi = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # 2 × [B, L, Hn, Dh/2]
    c, s = cos[:, None, :], sin[:, None, :]  # [L, 1, Dh/2]
    out = torch.stack([xr * c - xi * s, xr * s + xi * c], dim=-1)  # [B, L, Hn, Dh/2, 2]
    return out.flatten(-2).to(x.dtype)


def rms_norm_plain(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS norm over the last dim, normalised in fp32, rounded to x's dtype before the weight (as the reference)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # [..., D] fp32
    return y.to(x.dtype) * weight.to(x.dtype)


def rms_norm_rope_plain(x: torch.Tensor, weight: torch.Tensor, eps: float,
                        rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """x: [B, L, D] with D = Hn·Dh; weight: [D]; rope: cos/sin [L, Dh/2] or None -> [B, L, D] in x's dtype."""
    y = rms_norm_plain(x, weight, eps)  # [B, L, D]
    if rope is None:
        return y
    cos, sin = rope
    return apply_rope(y.unflatten(-1, (-1, 2 * cos.shape[-1])), cos, sin).flatten(-2)  # [B, L, D]


def layer_norm_fp32(x: torch.Tensor, eps: float, weight: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """LayerNorm in fp32 over the last dim, affine when weight/bias are given. x: [B, L, D] -> fp32 [B, L, D]."""
    w = weight.float() if weight is not None else None
    b = bias.float() if bias is not None else None
    return F.layer_norm(x.float(), (x.shape[-1],), w, b, eps)


def ln_modulate_plain(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                      out_dtype: torch.dtype) -> torch.Tensor:
    """x: [B, L, D] fp32; shift/scale: [B, 1|L, D] fp32 -> LN(x)·(1 + scale) + shift, [B, L, D] in out_dtype."""
    return (layer_norm_fp32(x, eps) * (1 + scale) + shift).to(out_dtype)


def gated_residual_plain(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
    """x: [B, L, D] fp32; y: [B, L, D] any dtype; gate: [B, 1|L, D] fp32 or None -> x + y·gate, fp32."""
    return x + y.float() * gate if gate is not None else x + y.float()


def _rms_norm_rope_fallback(x, weight, cos, sin, eps):
    # custom ops must not return an input or a view of one
    out = rms_norm_rope_plain(x, weight, eps, None if cos is None else (cos, sin))
    return out.clone() if out is x else out


# ------------------------------------------------------------------------------------------------------------
# Triton launches as custom ops (registered on every machine; only called where triton runs)


@torch.library.custom_op("wanrender::rms_norm_rope", mutates_args=())
def _rms_norm_rope_op(x: torch.Tensor, weight: torch.Tensor, cos: Optional[torch.Tensor],
                      sin: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    return _run_triton("rms_norm_rope", _rms_norm_rope_fallback, x, weight, cos, sin, eps)


@_rms_norm_rope_op.register_fake
def _(x, weight, cos, sin, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("wanrender::ln_modulate", mutates_args=())
def _ln_modulate_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                    out_dtype: torch.dtype) -> torch.Tensor:
    return _run_triton("ln_modulate", ln_modulate_plain, x, shift, scale, eps, out_dtype)


@_ln_modulate_op.register_fake
def _(x, shift, scale, eps, out_dtype):
    return torch.empty(x.shape, dtype=out_dtype, device=x.device)


@torch.library.custom_op("wanrender::gated_residual", mutates_args=())
def _gated_residual_op(x: torch.Tensor, y: torch.Tensor, gate: Optional[torch.Tensor]) -> torch.Tensor:
    return _run_triton("gated_residual", gated_residual_plain, x, y, gate)


@_gated_residual_op.register_fake
def _(x, y, gate):
    return torch.empty(x.shape, dtype=torch.float32, device=x.device)


# ------------------------------------------------------------------------------------------------------------
# dispatchers: what the model calls


def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float,
                  rope: tuple[torch.Tensor, torch.Tensor] | None = None, fused: bool = True) -> torch.Tensor:
    """RMSNorm over D (and RoPE per head when `rope` is given). x: [B, L, D] -> [B, L, D] in x's dtype."""
    if _use_triton(x, fused) and x.dtype in (torch.bfloat16, torch.float16, torch.float32):
        cos, sin = rope if rope is not None else (None, None)
        return _rms_norm_rope_op(x, weight, cos, sin, eps)
    return rms_norm_rope_plain(x, weight, eps, rope)


def ln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                out_dtype: torch.dtype, fused: bool = True) -> torch.Tensor:
    """LN(x)·(1 + scale) + shift, fp32 math. x: [B, L, D] fp32; shift/scale [B, 1|L, D] -> [B, L, D] out_dtype."""
    if _use_triton(x, fused):
        return _ln_modulate_op(x, shift, scale, eps, out_dtype)
    return ln_modulate_plain(x, shift, scale, eps, out_dtype)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None = None,
                   fused: bool = True) -> torch.Tensor:
    """x + y·gate in fp32. x: [B, L, D] fp32; y: [B, L, D]; gate: [B, 1|L, D] fp32 or None -> [B, L, D] fp32."""
    if _use_triton(x, fused):
        return _gated_residual_op(x, y, gate)
    return gated_residual_plain(x, y, gate)
