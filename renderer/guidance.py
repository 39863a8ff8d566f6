"""Guiders: how the model's velocity for one step is made from a conditioner's branches.

    none        one forward of the "cond" branch (guidance scale ignored);
    sequential  classifier-free guidance on one rank: cond then uncond forward, v = v_u + g·(v_c − v_u)
                (the official order; g = 1 skips the uncond forward, whose result would cancel);
    cfg_parallel  the two halves of a render group (parallel.cfg = 2) run cond and uncond at the same time, one
                all-gather of the velocities over the cfg pair, then every rank combines — all ranks hold the same v.

What "uncond" means is the conditioner's business (Wan2.2: the negative prompt's text; Animate: also a blank face),
so a guider never touches a model input itself.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import Tensor

from renderer.families.spec import Conditioner
from renderer.parallel.sequence import all_gather_dim0

Model = Callable[..., Tensor]  # model(**conditioner.model_inputs(...)) -> v [B, C_out, F, H, W]


class Guider(Protocol):
    name: str

    def velocity(self, model: Model, cond: Conditioner, latent: Tensor, t: float, scale: float) -> Tensor: ...


class NoGuidance:
    name = "none"

    def velocity(self, model: Model, cond: Conditioner, latent: Tensor, t: float, scale: float) -> Tensor:
        return model(**cond.model_inputs(latent, t, "cond")).float()  # [B, C, F, H, W]


class SequentialCFG:
    name = "sequential"

    def velocity(self, model: Model, cond: Conditioner, latent: Tensor, t: float, scale: float) -> Tensor:
        v_c = model(**cond.model_inputs(latent, t, "cond")).float()  # [B, C, F, H, W]
        if scale == 1.0:  # uncond + 1·(cond − uncond) = cond: the uncond forward would be wasted
            return v_c
        v_u = model(**cond.model_inputs(latent, t, "uncond")).float()  # [B, C, F, H, W]
        return v_u + scale * (v_c - v_u)


class ParallelCFG:
    """cfg coordinate 0 runs "cond", 1 runs "uncond"; `group` is a renderer.parallel RenderGroup with cfg = 2."""

    name = "cfg_parallel"

    def __init__(self, group):
        self.group = group

    def velocity(self, model: Model, cond: Conditioner, latent: Tensor, t: float, scale: float) -> Tensor:
        branch = "cond" if self.group.cfg_rank == 0 else "uncond"
        mine = model(**cond.model_inputs(latent, t, branch)).float()  # [B, C, F, H, W]
        both = all_gather_dim0(mine.unsqueeze(0), self.group.cfg_group(), 2)  # [2, B, C, F, H, W]: cond, uncond
        v_c, v_u = both[0], both[1]
        return v_u + scale * (v_c - v_u)


def make_guider(group=None, guidance: bool = True) -> Guider:
    """The guider for a render group (None: one device). guidance=False: no uncond pass at all."""
    if not guidance:
        if group is not None and group.pcfg.cfg == 2:
            raise ValueError("parallel.cfg=2 needs classifier-free guidance: use a layout with cfg=1")
        return NoGuidance()
    if group is not None and group.pcfg.cfg == 2:
        return ParallelCFG(group)
    return SequentialCFG()
