"""The denoising loop of one shot, on one GPU or a whole render group.

    latent = denoise(experts, boundary, guidances, sampler, noise, context, context_null, group=group)

Per step i with timestep t = sampler.timesteps[i]:
  1. expert and guidance: A14B has two experts — t ≥ boundary·1000 -> experts[0] (high noise) with guidances[1],
     else experts[1] (low noise) with guidances[0]; a single expert (ti2v-5B) always uses guidances[0];
  2. velocity with classifier-free guidance, v = v_u + g·(v_c − v_u):
       cfg=1: the cond and the uncond forward one after the other on every rank (two batch-1 forwards, as the
              official code; g = 1 skips the uncond forward);
       cfg=2: ranks with cfg coordinate 0 run the cond forward, 1 the uncond, at the same time; one all-gather of
              the velocity over the cfg group, then every rank combines — so all ranks hold the same v;
  3. latent = sampler.step(v, i, latent), then the task's `after_step` (ti2v re-imposes the first frame).
Sequence parallelism is inside the experts (see parallelize.py): a forward returns the full velocity on every rank.

Every rank runs the same loop on the same latent: the pipeline draws the noise from the shot seed on each rank,
and rank 0's copy is broadcast at the start anyway, so a rank whose generator differs cannot split the group.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from renderer.parallel.group import RenderGroup
from renderer.parallel.sequence import all_gather_dim0

Model = Callable[[Tensor, Tensor, Tensor], Tensor]  # (x [B,C_in,F,H,W], t [B] or [B,L], context) -> v [B,C,F,H,W]


def select_expert(t: float, boundary: float | None, num_experts: int, guidances: Sequence[float]) -> tuple[int, float]:
    """(expert index, guidance scale) for timestep t in [0, 1000]; guidances = (low-noise g, high-noise g)."""
    if num_experts == 1 or boundary is None:
        return 0, float(guidances[0])
    if num_experts != 2:
        raise ValueError(f"expected 1 or 2 experts, got {num_experts}")
    return (0, float(guidances[1])) if t >= boundary * 1000 else (1, float(guidances[0]))


def guided_velocity(model: Model, x: Tensor, t: Tensor, context: Tensor, context_null: Tensor, guidance: float,
                    group: RenderGroup | None = None) -> Tensor:
    """v_u + g·(v_c − v_u) in fp32. x: model input [B, C_in, F, H, W] -> [B, C_out, F, H, W]."""
    if group is not None and group.pcfg.cfg == 2:
        mine = model(x, t, context if group.cfg_rank == 0 else context_null).float()  # [B, C, F, H, W]
        both = all_gather_dim0(mine.unsqueeze(0), group.cfg_group(), 2)  # [2, B, C, F, H, W]: cond, uncond
        v_c, v_u = both[0], both[1]
    else:
        v_c = model(x, t, context).float()
        if guidance == 1.0:  # uncond + 1·(cond − uncond) = cond: the uncond forward would be wasted
            return v_c
        v_u = model(x, t, context_null).float()
    return v_u + guidance * (v_c - v_u)


@torch.no_grad()
def denoise(experts: Sequence[Model], boundary: float | None, guidances: float | Sequence[float], sampler,
            latent: Tensor, context: Tensor, context_null: Tensor, *, group: RenderGroup | None = None,
            t_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
            x_fn: Callable[[Tensor], Tensor] | None = None,
            after_step: Callable[[Tensor, int], Tensor] | None = None,
            callback: Callable[[int, float, int], None] | None = None) -> Tensor:
    """Run all of `sampler`'s steps on `latent` and return the final latent (fp32, same shape).

    experts: 1 or 2 velocity models (parallelised with the same `group`), or any object with len() and [] — e.g.
    a view whose [] moves the chosen expert onto the GPU (single-GPU offload); boundary: A14B switch in [0, 1]
    or None; guidances: (low-noise g, high-noise g) or one float; sampler: fresh from
    renderer.sampling.make_sampler(name, steps, shift); latent: [B, C, F, H, W] noise (same seed on every rank);
    context / context_null: [B, Lc, text_dim] prompt and negative-prompt embeddings.
    Task hooks (defaults for t2v):
      t_fn(t, latent) -> the model's timestep input, [B] or per token [B, L] (ti2v: first frame's tokens get 0);
      x_fn(latent) -> model input (i2v: cat([latent, mask and image latent], dim=1));
      after_step(latent, i) -> latent (ti2v: put the conditioning frame back);
      callback(i, t, expert_index) after each step (progress, ETA).
    """
    if isinstance(guidances, (int, float)):
        guidances = (float(guidances), float(guidances))
    latent = latent.float()
    if group is not None and group.distributed:
        dist.broadcast(latent, src=0)  # the group must agree on the noise bit for bit (see module docstring)
    for i, t in enumerate(sampler.timesteps.tolist()):
        k, g = select_expert(t, boundary, len(experts), guidances)
        x_in = x_fn(latent) if x_fn is not None else latent
        tt = t_fn(torch.tensor(t), latent) if t_fn is not None else torch.full((latent.shape[0],), t)
        v = guided_velocity(experts[k], x_in, tt.to(latent.device), context, context_null, g, group)
        latent = sampler.step(v, i, latent)
        if after_step is not None:
            latent = after_step(latent, i)
        if callback is not None:
            callback(i, t, k)
    return latent
