"""The denoising loop of one shot, the same on one GPU and on a render group.

    latent = denoise(experts, conditioner, sampler, noise, guider=make_guider(group), boundary=..., guidances=...)

Per step i with timestep t = sampler.timesteps[i]:
  1. expert and guidance: two experts (A14B) — t ≥ boundary·1000 -> experts[0] (high noise) with guidances[1],
     else experts[1] (low noise) with guidances[0]; a single expert always uses guidances[0];
  2. velocity: the guider asks the conditioner for each branch's model inputs (renderer/guidance.py);
  3. latent = sampler.step(v, i, latent), then conditioner.after_step (ti2v puts its conditioning frame back).
Sequence parallelism is inside the experts (renderer/parallel): a forward returns the full velocity on every rank.

In a group every rank runs this loop on the same latent: rank 0's noise is broadcast at the start, so a rank whose
generator differs cannot split the group.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from renderer.families.spec import Conditioner
from renderer.guidance import Guider, SequentialCFG


def select_expert(t: float, boundary: float | None, num_experts: int, guidances: Sequence[float]) -> tuple[int, float]:
    """(expert index, guidance scale) for timestep t in [0, 1000]; guidances = (low-noise g, high-noise g)."""
    if num_experts == 1 or boundary is None:
        return 0, float(guidances[0])
    if num_experts != 2:
        raise ValueError(f"expected 1 or 2 experts, got {num_experts}")
    return (0, float(guidances[1])) if t >= boundary * 1000 else (1, float(guidances[0]))


@torch.no_grad()
def denoise(experts: Sequence[Callable[..., Tensor]], conditioner: Conditioner, sampler, latent: Tensor, *,
            guider: Guider | None = None, boundary: float | None = None,
            guidances: float | Sequence[float] = 5.0, group=None,
            callback: Callable[[int, float, int], None] | None = None) -> Tensor:
    """Run all of `sampler`'s steps from `latent` ([B, C, F, H, W] noise) and return the final latent (fp32).

    experts: 1 or 2 models (or any object with len() and [] — e.g. a view that moves the chosen expert onto the
    GPU first); conditioner: the task's (renderer/families/<family>/conditioners.py); sampler: fresh from
    renderer.sampling.make_sampler; guider: renderer.guidance.make_guider(group) (default: sequential CFG);
    group: the render group when distributed (for the noise broadcast); callback(i, t, expert) after each step.
    """
    guider = guider or SequentialCFG()
    if isinstance(guidances, (int, float)):
        guidances = (float(guidances), float(guidances))
    latent = latent.float()
    if group is not None and group.distributed:
        dist.broadcast(latent, src=0)  # the group must agree on the noise bit for bit (see module docstring)
    latent = conditioner.prepare(latent)  # [B, C, F, H, W]
    for i, t in enumerate(sampler.timesteps.tolist()):
        k, g = select_expert(t, boundary, len(experts), guidances)
        v = guider.velocity(experts[k], conditioner, latent, t, g)  # [B, C, F, H, W] fp32
        latent = conditioner.after_step(sampler.step(v, i, latent))  # [B, C, F, H, W]
        if callback is not None:
            callback(i, t, k)
    return latent
