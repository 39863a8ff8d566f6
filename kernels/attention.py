"""One attention function for the whole renderer.

Every attention call of the DiT goes through `attention(q, k, v)`. It takes the flash-attn layout
[B, L, H, D] (tokens before heads: what the projections produce and what Ulysses all-to-all splits) and
dispatches to a backend:

  "sdpa"            torch scaled_dot_product_attention, torch picks the kernel (the default)
  "sdpa_cudnn"      SDPA restricted to the cuDNN kernel      (fastest on Hopper: ~580 TFLOP/s on an H200)
  "sdpa_flash"      SDPA restricted to the flash kernel
  "sdpa_efficient"  SDPA restricted to the memory-efficient kernel
  "math"            SDPA math kernel (runs everywhere; the CPU fallback)
  "flash_attn"      the flash-attn package (FlashAttention 3 `flash_attn_interface` if importable, else 2)
  "xformers"        xformers.ops.memory_efficient_attention
  "fp8_triton"      our FP8 Triton kernel (kernels/fp8_attention.py) — LOSSY: listed by available_backends only
                    with allow_lossy=True, so "auto" never measures or picks it; the fast tier names it explicitly
  "auto"            the fastest of the above for (GPU name, dtype, head dim, sequence-length bucket), measured once
                    and cached on disk (kernels/autotune.py); a fixed ranking when measuring is off; "sdpa" on CPU

flash-attn and xformers are optional extras: asking for one that is not installed raises an error that says
how to install it, and `available_backends()` lists only what works here.
"""
from __future__ import annotations

import contextlib
import importlib.util
from typing import Callable

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "math", "flash_attn", "xformers", "fp8_triton")
# backends whose output differs from exact attention by more than rounding: never chosen by "auto"
LOSSY_BACKENDS = ("fp8_triton",)

_SDPA_KERNEL = {
    "sdpa_cudnn": "CUDNN_ATTENTION",
    "sdpa_flash": "FLASH_ATTENTION",
    "sdpa_efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
}

# "auto" is the default: on the CPU it resolves to "sdpa" (bit-identical to asking for "sdpa"), on a GPU to the
# measured fastest kernel, so a render takes the fast path without a flag
_default_backend = "auto"


def set_default_backend(name: str) -> None:
    """Backend used when `attention` is called without one (set once per process from the config)."""
    global _default_backend
    _check_name(name)
    _default_backend = name


def get_default_backend() -> str:
    return _default_backend


def _check_name(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}: choose one of {', '.join(BACKENDS)}")


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def available_backends(device: torch.device | str = "cpu", allow_lossy: bool = False) -> list[str]:
    """The backends that can run on `device` in this environment; lossy ones only when `allow_lossy`."""
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
    if allow_lossy and _has_module("triton") and torch.cuda.get_device_capability(dev) >= (8, 9):
        names.append("fp8_triton")
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


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Softmax attention, no mask, scale 1/sqrt(D).

    q: [B, Lq, H, D], k and v: [B, Lk, H, D] (same dtype) -> [B, Lq, H, D].
    """
    name = backend or _default_backend
    if name == "auto":
        from kernels.autotune import choose

        # python constants only: under torch.compile the choice is made once at trace time and baked in
        name = choose(q.device, q.dtype, q.shape[-1], q.shape[1], k.shape[1])
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
    _check_name(name)
    raise AssertionError("unreachable")


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain softmax(QK^T/sqrt(D))V in float64: the yardstick the backends are tested against."""
    qd, kd, vd = (t.double().transpose(1, 2) for t in (q, k, v))  # [B, H, L, D]
    scores = qd @ kd.transpose(-1, -2) / qd.shape[-1] ** 0.5  # [B, H, Lq, Lk]
    return (scores.softmax(-1) @ vd).transpose(1, 2)  # [B, Lq, H, D]


def resolved_backend() -> str:
    """What `attention()` without a backend argument ran, for the run log and the sidecar.

    A fixed default is reported as is; "auto" as "auto:<choice>", listing every distinct choice made so far in this
    process ("auto:sdpa_cudnn", or "auto:sdpa_cudnn+sdpa_flash" when shapes chose differently), or "auto" when
    nothing ran yet.
    """
    if _default_backend != "auto":
        return _default_backend
    from kernels.autotune import choices_made

    made = sorted(set(choices_made().values()))
    return "auto:" + "+".join(made) if made else "auto"


AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
