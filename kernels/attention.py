"""One attention function for the whole renderer: `attention(q, k, v, backend, allow_lossy)`.

It takes the flash-attn layout [B, L, H, D] (tokens before heads: what the projections produce and what Ulysses
all-to-all splits) and runs the named backend of kernels/backends.py, or with "auto" the fastest backend
measured for (GPU, dtype, head dim, sequence-length bucket) (kernels/autotune.py; "sdpa" on the CPU). Which
backend a model uses comes from its pipeline's KernelSettings (kernels/settings.py), never a process default.
"""
from __future__ import annotations

from typing import Callable

import torch

from kernels import autotune
from kernels.backends import BACKEND_NAMES, BACKENDS, EXACT, available_backends, run_backend  # noqa: F401 (API)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto",
              allow_lossy: bool = False) -> torch.Tensor:
    """Softmax attention, no mask, scale 1/sqrt(D).

    q: [B, Lq, H, D], k and v: [B, Lk, H, D] (same dtype) -> [B, Lq, H, D].
    """
    name = backend
    if name == "auto":
        # python constants only: under torch.compile the choice is made once at trace time and baked in
        name = autotune.choose(q.device, q.dtype, q.shape[-1], q.shape[1], k.shape[1], allow_lossy=allow_lossy)
    return run_backend(name, q, k, v)  # [B, Lq, H, D]


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain softmax(QK^T/sqrt(D))V in float64: the yardstick the backends are tested against."""
    qd, kd, vd = (t.double().transpose(1, 2) for t in (q, k, v))  # [B, H, L, D]
    scores = qd @ kd.transpose(-1, -2) / qd.shape[-1] ** 0.5  # [B, H, Lq, Lk]
    return (scores.softmax(-1) @ vd).transpose(1, 2)  # [B, Lq, H, D]


def resolved_backend(requested: str) -> str:
    """What `attention(..., backend=requested)` ran, for the run log and the sidecar.

    A fixed backend is reported as is; "auto" as "auto:<choice>", listing every distinct choice made so far in this
    process ("auto:sdpa_cudnn", or "auto:sdpa_cudnn+sdpa_flash" when shapes chose differently), or "auto" when
    nothing ran yet.
    """
    if requested != "auto":
        return requested
    made = sorted(set(autotune.choices_made().values()))
    return "auto:" + "+".join(made) if made else "auto"


AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
