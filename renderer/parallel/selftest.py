"""Tiny shots with random weights, for checking a parallel layout against one process (tests and launch --check).

`tiny_shot(task)` builds what `renderer.denoise.denoise` needs for a tiny t2v / i2v / ti2v render from
conf/model/tiny_<task>.yaml: the experts (weights drawn from a fixed seed, so every rank and the reference agree),
noise, random text embeddings, and the task's conditioner made by the family's own builder — the one the
pipeline uses — from a seeded random input image and the preset's tiny VAE. `run_shot(shot, group)` renders it.
"""
from __future__ import annotations

import atexit
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from kernels.settings import KernelSettings
from renderer.denoise import denoise
from renderer.families import get_family
from renderer.families.spec import Conditioner, ShotInputs
from renderer.guidance import make_guider
from renderer.parallel.group import RenderGroup
from renderer.sampling import make_sampler

def load_model_preset(name: str):
    from renderer.presets import load_preset

    return load_preset(name)


@dataclass
class TinyShot:
    task: str
    preset: Any  # renderer.presets.ModelPreset
    steps: int
    sampler: str
    noise: torch.Tensor  # [1, C_out, F, H, W]
    inputs: ShotInputs  # what the family's conditioner builder gets (fp32 contexts on the CPU)

    def conditioner(self, device: torch.device, dtype: torch.dtype) -> Conditioner:
        """The task's conditioner from the family's own builder, contexts in the render dtype on `device`."""
        inputs = replace(self.inputs, context=self.inputs.context.to(device, dtype),
                         context_null=self.inputs.context_null.to(device, dtype), device=device,
                         vae=self.inputs.vae.to(device) if self.inputs.vae is not None else None)
        return get_family(self.preset.family).conditioners[self.task](inputs)

    @property
    def dit(self):
        return self.preset.dit

    def experts(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                kernels: KernelSettings | None = None) -> list:
        build = get_family(self.preset.family).build_model
        return [build(self.preset.dit, dtype=dtype, device=device, seed=self.preset.seed_weights + i)
                .use_kernels(kernels or KernelSettings()) for i in range(len(self.preset.experts))]


def _image_file(width: int, height: int, seed: int) -> str:
    """A seeded random RGB PNG (the same bytes on every rank)."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    folder = Path(tempfile.mkdtemp(prefix="wanrender-selftest-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # this process's copy, gone when it exits
    path = folder / "image.png"
    Image.fromarray(pixels).save(path)
    return str(path)


def tiny_shot(task: str, grid: tuple[int, int, int] = (3, 6, 10), steps: int = 3, sampler: str = "unipc",
              seed: int = 0, preset: str | None = None) -> TinyShot:
    """grid: latent F×H×W (H, W even). (3, 6, 10) -> 3·3·5 = 45 tokens, which no world size > 1 divides."""
    from renderer.vae import build_vae

    p = load_model_preset(preset or f"tiny_{task}")
    g = torch.Generator().manual_seed(seed)
    f, h, w = grid
    noise = torch.randn(1, p.vae.z_dim, f, h, w, generator=g)  # [1, z, F', h, w]
    context = torch.randn(1, 7, p.dit.text_dim, generator=g)  # [1, 7, text_dim]
    context_null = torch.randn(1, 4, p.dit.text_dim, generator=g)  # [1, 4, text_dim]
    st, sh, sw = p.vae.stride
    size = (w * sw, h * sh)
    family = get_family(p.family)
    image = _image_file(*size, seed) if task in family.accepts_image else None
    vae = build_vae(p.vae.version, tiny=p.vae.tiny, dtype=torch.float32, seed=p.seed_weights) if image else None
    inputs = ShotInputs(task=task, context=context, context_null=context_null, latent_shape=tuple(noise.shape[1:]),
                        size=size, frames=(f - 1) * st + 1, image=image, vae=vae, device=torch.device("cpu"),
                        model_config=p.dit)
    return TinyShot(task, p, steps, sampler, noise, inputs)


def run_shot(shot: TinyShot, group: RenderGroup | None = None, dtype: torch.dtype = torch.float32,
             experts: list | None = None, kernels: KernelSettings | None = None,
             guidance: float | tuple[float, float] | None = None) -> torch.Tensor:
    """Render `shot` (parallelising fresh experts over `group` when it has more than one rank) -> final latent.
    guidance: the scale(s) to use (None: the preset's)."""
    device = group.device if group is not None else torch.device("cpu")
    if experts is None:
        experts = shot.experts(dtype, device, kernels)
        if group is not None and group.distributed:
            experts = group.parallelize_experts(experts)
    sampler = make_sampler(shot.sampler, shot.steps, shot.preset.shift)
    return denoise(experts, shot.conditioner(device, dtype), sampler, shot.noise.to(device),
                   guider=make_guider(group), boundary=shot.preset.boundary if len(experts) == 2 else None,
                   guidances=shot.preset.guidance if guidance is None else guidance, group=group)
