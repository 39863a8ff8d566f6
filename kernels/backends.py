"""The attention backends and what each promises.

Every backend takes the flash-attn layout [B, L, H, D] and returns softmax attention (no mask, scale 1/sqrt(D)):

  "sdpa"            torch scaled_dot_product_attention, torch picks the kernel
  "sdpa_cudnn"      SDPA restricted to the cuDNN kernel      (fastest on Hopper: ~580 TFLOP/s on an H200)
  "sdpa_flash"      SDPA restricted to the flash kernel
  "sdpa_efficient"  SDPA restricted to the memory-efficient kernel
  "math"            SDPA math kernel (runs everywhere; the CPU fallback)
  "flash_attn"      the flash-attn package (FlashAttention 3 `flash_attn_interface` if importable, else 2)
  "xformers"        xformers.ops.memory_efficient_attention
  "fp8_triton"      our FP8 Triton kernel (kernels/fp8_attention.py, issue 14) — LOSSY: not in EXACT, so "auto"
                    measures it only when the kernel settings allow lossy kernels (the fast tier)

EXACT names the backends that give the same numbers as the others within bf16 rounding; "auto" chooses only
among them unless the kernel settings allow lossy ones (an FP8 backend, issue 14, would be registered lossy).
flash-attn and xformers are optional extras: asking for one that is not installed raises an error that says
how to install it, and `available_backends()` lists only what works here.
"""
from __future__ import annotations

import contextlib
import importlib.util

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "math", "flash_attn", "xformers", "fp8_triton")
BACKEND_NAMES = ("auto", *BACKENDS)  # what kernel settings may name
# same numbers within bf16 rounding: exact softmax attention in the input precision (not the FP8 kernel)
LOSSY = frozenset({"fp8_triton"})
EXACT = frozenset(BACKENDS) - LOSSY

_SDPA_KERNEL = {
    "sdpa_cudnn": "CUDNN_ATTENTION",
    "sdpa_flash": "FLASH_ATTENTION",
    "sdpa_efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
}

def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run on `device` in this environment."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return ["auto", "sdpa", "math"]
    names = ["auto", "sdpa", "sdpa_flash", "sdpa_efficient", "math"]
    if hasattr(torch.backends.cuda, "cudnn_sdp_enabled"):
        names.insert(2, "sdpa_cudnn")
    if _has_module("flash_attn_interface") or _has_module("flash_attn"):
        names.append("flash_attn")
    if _has_module("xformers"):
        names.append("xformers")
    if _has_module("triton") and torch.cuda.get_device_capability(dev) >= (8, 9):  # FP8 tensor cores
        names.append("fp8_triton")  # lossy: autotune.candidates keeps it out unless allow_lossy
    return names


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: str | None) -> torch.Tensor:
    # SDPA wants heads before tokens: [B, L, H, D] -> [B, H, L, D] (a view; the kernels accept strided input)
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, L, D]
    ctx = contextlib.nullcontext()
    if kernel is not None:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        ctx = sdpa_kernel([getattr(SDPBackend, kernel)])
    with ctx:
        out = F.scaled_dot_product_attention(qh, kh, vh)  # [B, H, Lq, D]
    return out.transpose(1, 2)  # [B, Lq, H, D]


def _flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    try:  # FlashAttention 3 (Hopper) first: it is the faster of the two where it is built
        from flash_attn_interface import flash_attn_func  # type: ignore

        out = flash_attn_func(q, k, v)
        return out[0] if isinstance(out, tuple) else out
    except ImportError:
        pass
    try:
        from flash_attn import flash_attn_func  # type: ignore
    except ImportError as e:
        raise RuntimeError(
            "attention backend 'flash_attn' asked for but flash-attn is not installed: "
            "pip install 'wanrender[gpu]' on a CUDA machine, or choose backend 'sdpa'"
        ) from e
    return flash_attn_func(q, k, v)  # [B, Lq, H, D]


def _xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    try:
        import xformers.ops as xops  # type: ignore
    except ImportError as e:
        raise RuntimeError(
            "attention backend 'xformers' asked for but xformers is not installed: "
            "pip install 'wanrender[gpu]' on a CUDA machine, or choose backend 'sdpa'"
        ) from e
    return xops.memory_efficient_attention(q, k, v)  # [B, Lq, H, D]


def run_backend(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention with one named backend. q: [B, Lq, H, D], k/v: [B, Lk, H, D] -> [B, Lq, H, D]."""
    if name == "sdpa":
        return _sdpa(q, k, v, None)
    if name in _SDPA_KERNEL:
        return _sdpa(q, k, v, _SDPA_KERNEL[name])
    if name == "flash_attn":
        return _flash_attn(q, k, v)
    if name == "xformers":
        return _xformers(q, k, v)
    if name == "fp8_triton":
        from kernels.fp8_attention import fp8_attention

        return fp8_attention(q, k, v)  # [B, Lq, H, D]
    raise ValueError(f"unknown attention backend {name!r}: choose one of {', '.join(BACKEND_NAMES)}")
