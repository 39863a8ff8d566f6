"""Wan2.2's conditioners, one per task: what the model gets for the cond and the uncond pass.

    t2v   x = the latent; t = one timestep per sample; context = prompt | negative prompt
    i2v   x = cat[latent, 4 mask channels, 16 image-latent channels] (36 channels, A14B i2v experts)
    ti2v  x = the latent with its first latent frame pinned to the image's latent; t per token, 0 on the pinned
          frame's tokens (the 5B model reads the clean frame); the pinned frame is put back after every step

The same classes run on one GPU, in a render group and in the multi-rank tests (built from tensors there);
`build_*` make them from a shot (encoding the input image with the VAE).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from renderer.families.spec import ShotInputs


class TextConditioner:
    """t2v: text only. Uncond = the negative prompt's embedding (what every Wan2.2 task shares)."""

    branches = ("cond", "uncond")
    task = "t2v"

    def __init__(self, context: Tensor, context_null: Tensor):
        self.contexts = {"cond": context, "uncond": context_null}  # [B, Lc, text_dim] each

    def prepare(self, latent: Tensor) -> Tensor:
        return latent

    def after_step(self, latent: Tensor) -> Tensor:
        return latent

    def model_latent(self, latent: Tensor) -> Tensor:
        return latent  # [B, C, F, H, W]

    def timesteps(self, latent: Tensor, t: float) -> Tensor:
        return torch.full((latent.shape[0],), float(t), device=latent.device)  # [B]

    def model_inputs(self, latent: Tensor, t: float, branch: str) -> dict[str, Tensor]:
        return {"x": self.model_latent(latent), "t": self.timesteps(latent, t), "context": self.contexts[branch]}

    def describe(self) -> dict[str, Any]:
        return {"task": self.task, "branches": list(self.branches)}


class ImageConcatConditioner(TextConditioner):
    """i2v: mask + image latent concatenated to the noise on channels. y: [B, 4 + z, F', h, w]."""

    task = "i2v"

    def __init__(self, context: Tensor, context_null: Tensor, y: Tensor):
        super().__init__(context, context_null)
        self.y = y

    def model_latent(self, latent: Tensor) -> Tensor:
        return torch.cat([latent, self.y.to(latent.device, latent.dtype)], dim=1)  # [B, C + 4 + z, F', h, w]


class FirstFrameConditioner(TextConditioner):
    """ti2v: the first latent frame is the image's latent (first: [B, C, 1, h, w]), clean (t = 0) and pinned."""

    task = "ti2v"

    def __init__(self, context: Tensor, context_null: Tensor, first: Tensor, patch_size: tuple[int, int, int]):
        super().__init__(context, context_null)
        self.first = first
        self.patch_size = patch_size

    def _keep(self, latent: Tensor) -> Tensor:
        keep = torch.ones_like(latent)  # [B, C, F, H, W]: 1 where the sampler moves the latent
        keep[:, :, 0] = 0.0  # 0 on the pinned first frame
        return keep

    def prepare(self, latent: Tensor) -> Tensor:
        keep = self._keep(latent)
        return (1 - keep) * self.first.to(latent.device, latent.dtype) + keep * latent  # [B, C, F, H, W]

    after_step = prepare

    def timesteps(self, latent: Tensor, t: float) -> Tensor:
        pt, ph, pw = self.patch_size
        token_keep = self._keep(latent)[:, 0, ::pt, ::ph, ::pw].flatten(1)  # [B, L]: 0 on the image's tokens
        return token_keep * float(t)  # [B, L]


# ----------------------------------------------------------------------------------------------------------
# from a shot


def _image(inputs: ShotInputs) -> Tensor:
    """The input image prepared as the official code does for this task (images.py)."""
    from renderer.families.wan22.images import prepare_image

    return prepare_image(inputs.task, inputs.image, inputs.size).to(inputs.device)  # [3, H, W] in [-1, 1]


def build_t2v(inputs: ShotInputs) -> TextConditioner:
    return TextConditioner(inputs.context, inputs.context_null)


def build_i2v(inputs: ShotInputs) -> ImageConcatConditioner:
    """The image as frame 0 of an otherwise black video, VAE-encoded; the mask marks the first latent frame."""
    _, f, h, w = inputs.latent_shape
    width, height = inputs.size
    vae_dtype = next(inputs.vae.parameters()).dtype
    video = torch.zeros(1, 3, inputs.frames, height, width, device=inputs.device)  # [1, 3, F, H, W]
    video[:, :, 0] = _image(inputs)
    with torch.no_grad():
        y = inputs.vae.encode(video.to(vae_dtype)).float()  # [1, z, F', h, w]
    mask = torch.zeros(1, 4, f, h, w, device=inputs.device)
    mask[:, :, 0] = 1.0  # the first latent frame holds the given image (4 video frames per latent frame)
    return ImageConcatConditioner(inputs.context, inputs.context_null, torch.cat([mask, y], dim=1))  # [1, 4+z, ...]


def build_ti2v(inputs: ShotInputs) -> TextConditioner:
    """With an image: its latent pins the first frame; without one the 5B model renders t2v."""
    if not inputs.image:
        return TextConditioner(inputs.context, inputs.context_null)
    vae_dtype = next(inputs.vae.parameters()).dtype
    with torch.no_grad():
        first = inputs.vae.encode(_image(inputs)[None, :, None].to(vae_dtype)).float()  # [1, z, 1, h, w]
    return FirstFrameConditioner(inputs.context, inputs.context_null, first, tuple(inputs.model_config.patch_size))
