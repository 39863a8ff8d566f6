"""Regional torch.compile of the DiT: each WanBlock compiled on its own, not the whole model.

The 40 blocks of an expert share one code object and (with dynamo's default inlining of nn.Module parameters
as graph inputs) one compiled graph, so compile time is that of one block, paid once per token-grid shape; both
A14B experts and every later shot of the same shape reuse it from torch's in-process cache, and Inductor's
on-disk cache makes a fresh process cheaper again. dynamic=False: a render farm runs a handful of fixed sizes,
and static shapes give Inductor the best kernels. Inductor fuses what eager runs as separate kernels around the
matmuls (the GELU and bias into the FFN's epilogue, norm3's LayerNorm, casts); our Triton ops in kernels/fused.py
stay opaque custom ops inside the graph.

When: WanDiT.compile_mode "auto" (the default) compiles on the first forward on a CUDA device, never on the CPU
(compiling buys nothing for the tiny CPU models and costs seconds per test), and not while sequence parallelism
is plugged in (its attn_fn holds all-to-alls and ring send/receives that dynamo would have to trace or break
around: untested, so the parallel code opts in with compile_mode "on" once its GPU tests pass under compile);
"on" / "off" force it; WANRENDER_COMPILE=0/1 overrides "auto" for a whole process.
"""
from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("wanrender.compile")

# dynamo's per-code-object cache: one entry per (shape, dtype, per-token timesteps or not). Its default (8)
# would silently fall back to eager after a few sizes in one long-running worker.
_RECOMPILE_LIMIT = 64


def compile_wanted(mode: str, device: torch.device, sharded: bool = False) -> bool:
    """Whether a model in `mode` ("auto" | "on" | "off") should compile its blocks on `device`.

    auto: on CUDA, unless the blocks are FSDP-sharded (FSDP2's hooks around a block compiled after sharding are
    untested here). Sequence parallelism compiles: its attention is kept out of the graphs (parallelize.py).
    Measured on 4× H200 (benchmarks/RESULTS.md): eager sequence-parallel rows lost the ~8 % compile gives."""
    if mode == "on":
        return True
    if mode == "off":
        return False
    if mode != "auto":
        raise ValueError(f"compile mode {mode!r}: choose auto, on or off")
    env = os.environ.get("WANRENDER_COMPILE")
    if env is not None:
        return env.lower() not in ("0", "false", "no", "off", "")
    return torch.device(device).type == "cuda" and not sharded


def compile_blocks(model: torch.nn.Module, dynamic: bool = False, backend: str = "inductor",
                   mode: str | None = None) -> torch.nn.Module:
    """Compile every block of `model.blocks` in place (nn.Module.compile); idempotent. Returns the model.

    Compilation itself happens at the first forward of each new shape; WanDiT.forward times that first block
    call and records it in `model.compile_seconds` ({shape key: seconds}) and the log.
    """
    if getattr(model, "_blocks_compiled", False):
        return model
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # renamed across torch versions
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), _RECOMPILE_LIMIT))
    for block in model.blocks:
        block.compile(dynamic=dynamic, backend=backend, mode=mode)
    model._blocks_compiled = True
    log.info("blocks of %s set to compile (dynamic=%s, backend=%s)", type(model).__name__, dynamic, backend)
    return model


def blocks_compiled(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "_blocks_compiled", False))
