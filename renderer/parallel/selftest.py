"""Tiny shots with random weights, for checking a parallel layout against one process (tests and launch --check).

`tiny_shot(task)` builds everything `denoise` needs for a tiny t2v / i2v / ti2v render from the dims of
conf/model/tiny_<task>.yaml: the experts (weights drawn from a fixed seed, so every rank and the reference agree),
noise, text embeddings and the task hooks (i2v: image-latent channels; ti2v: per-token timesteps with t = 0 on the
conditioning frame, which is put back after every step).  `run_shot(shot, group)` renders it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from renderer.families.wan22.model import DiTConfig, build_dit
from renderer.parallel.denoise import denoise
from renderer.parallel.group import RenderGroup
from renderer.sampling import make_sampler

CONF = Path(__file__).resolve().parents[2] / "conf" / "model"


def load_model_preset(name: str) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"), resolve=True)


@dataclass
class TinyShot:
    task: str
    dit: DiTConfig
    num_experts: int
    boundary: float | None
    guidances: tuple[float, float]
    shift: float
    steps: int
    sampler: str
    noise: torch.Tensor  # [1, C_out, F, H, W]
    context: torch.Tensor  # [1, Lc, text_dim]
    context_null: torch.Tensor  # [1, Lc', text_dim]
    hooks: dict[str, Callable] = field(default_factory=dict)
    weight_seed: int = 0

    def experts(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> list:
        return [build_dit(self.dit, dtype=dtype, device=device, seed=self.weight_seed + i)
                for i in range(self.num_experts)]


def tiny_shot(task: str, grid: tuple[int, int, int] = (3, 6, 10), steps: int = 3, sampler: str = "unipc",
              seed: int = 0, preset: str | None = None, dit_overrides: dict | None = None) -> TinyShot:
    """grid: latent F×H×W (H, W even). (3, 6, 10) -> 3·3·5 = 45 tokens, which no world size > 1 divides."""
    p = load_model_preset(preset or f"tiny_{task}")
    dit = DiTConfig.from_dict({**p["dit"], **(dit_overrides or {})})
    g = torch.Generator().manual_seed(seed)
    f, h, w = grid
    noise = torch.randn(1, dit.out_dim, f, h, w, generator=g)
    context = torch.randn(1, 7, dit.text_dim, generator=g)
    context_null = torch.randn(1, 4, dit.text_dim, generator=g)
    hooks: dict[str, Callable] = {}
    if task == "i2v":  # 4 mask channels + image latent, concatenated on channels as the i2v model expects
        y = torch.randn(1, dit.in_dim - dit.out_dim, f, h, w, generator=g)
        hooks["x_fn"] = lambda x: torch.cat([x, y.to(x.device)], dim=1)
    elif task == "ti2v":
        first = torch.randn(1, dit.out_dim, 1, h, w, generator=g)  # the conditioning frame's latent
        per_frame = (h // dit.patch_size[1]) * (w // dit.patch_size[2])
        noise[:, :, :1] = first

        def t_fn(t, x):  # [B, L]: the first frame's tokens are clean (t = 0)
            tt = torch.full((x.shape[0], (f // dit.patch_size[0]) * per_frame), float(t))
            tt[:, :per_frame] = 0.0
            return tt

        def after_step(x, i):
            x = x.clone()
            x[:, :, :1] = first.to(x.device)
            return x

        hooks.update(t_fn=t_fn, after_step=after_step)
    experts = len(p.get("experts") or [None])
    boundary = p.get("boundary") if experts == 2 else None
    gl, gh = p["guidance"]
    return TinyShot(task, dit, experts, boundary, (float(gl), float(gh)), float(p["shift"]), steps, sampler,
                    noise, context, context_null, hooks, int(p.get("seed_weights") or 0))


def run_shot(shot: TinyShot, group: RenderGroup | None = None, dtype: torch.dtype = torch.float32,
             experts: list | None = None, attention_backend: str | None = None) -> torch.Tensor:
    """Render `shot` (parallelising fresh experts over `group` when it has more than one rank) -> final latent."""
    device = group.device if group is not None else torch.device("cpu")
    if experts is None:
        experts = shot.experts(dtype, device)
        if group is not None and group.distributed:
            experts = group.parallelize_experts(experts, attention_backend)
    sampler = make_sampler(shot.sampler, shot.steps, shot.shift)
    return denoise(experts, shot.boundary, shot.guidances, sampler, shot.noise.to(device),
                   shot.context.to(device, dtype), shot.context_null.to(device, dtype), group=group, **shot.hooks)
