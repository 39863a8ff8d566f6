"""What a model family declares about itself (a spec, in the manner of torchtitan's model specs).

A family is one package under renderer/families/ exposing `SPEC: FamilySpec`. Everything outside the package
(presets, the loader, the pipeline, the parallel layer) asks the spec instead of knowing the family.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch


class TokenSplit(Protocol):
    """What sequence parallelism plugs into a model (renderer/parallel/sequence.py's SequenceSharder)."""

    def split(self, x: torch.Tensor, dim: int) -> torch.Tensor: ...  # full tokens -> this rank's padded slice
    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor: ...  # slices -> full tokens, padding dropped


@dataclass(frozen=True)
class SequenceParallelPlan:
    """Where a model's tokens are split across and gathered from the sequence-parallel ranks (the role of
    diffusers' `_cp_plan`): declared by the model, applied by renderer/parallel without knowing the family.

    split: tensor of the forward's token stream -> its token dim, split right after the embeddings (a tensor with
    one row on that dim instead of L, such as a timestep shared by every token, is left whole);
    gather: output -> token dim, gathered before unpatchify;
    attention: module-path patterns (fnmatch) whose `attn_fn` slot takes the sequence-parallel attention.
    """

    split: dict[str, int]
    gather: dict[str, int]
    attention: tuple[str, ...]


def split_stream(splitter: TokenSplit, stream: dict[str, torch.Tensor], plan: dict[str, int],
                 num_tokens: int) -> dict[str, torch.Tensor]:
    """This rank's slice of every planned tensor of `stream` that has `num_tokens` rows on its planned dim."""
    out = dict(stream)
    for name, dim in plan.items():
        x = stream[name]
        if x.shape[dim] == num_tokens:
            out[name] = splitter.split(x, dim)  # [..., L, ...] -> [..., n, ...]
    return out


def gather_stream(splitter: TokenSplit, stream: dict[str, torch.Tensor],
                  plan: dict[str, int]) -> dict[str, torch.Tensor]:
    """Every planned output of `stream` gathered back to the full token count."""
    return {name: splitter.gather(x, plan[name]) if name in plan else x for name, x in stream.items()}


class Conditioner(Protocol):
    """A task's conditioning for one shot: builds the model's keyword inputs for each guidance branch.

    branches: the names a guider may ask for ("cond", "uncond"); "uncond" is whatever this task's unconditional
    pass is (Wan2.2: the negative prompt; Animate: the negative prompt and a blank face).
    """

    branches: tuple[str, ...]

    def prepare(self, latent: torch.Tensor) -> torch.Tensor: ...  # the initial noise -> the latent to denoise
    def model_inputs(self, latent: torch.Tensor, t: float, branch: str) -> dict[str, torch.Tensor]: ...
    def after_step(self, latent: torch.Tensor) -> torch.Tensor: ...  # re-impose what the task pins
    def describe(self) -> dict[str, Any]: ...  # what the sidecar records about the conditioning


@dataclass
class ShotInputs:
    """What the pipeline hands a family's conditioner builder for one shot (text already encoded)."""

    task: str
    context: torch.Tensor  # [1, Lc, text_dim] the prompt's embedding
    context_null: torch.Tensor  # [1, Lc, text_dim] the negative prompt's embedding
    latent_shape: tuple[int, ...]  # (C, F', h, w)
    size: tuple[int, int]  # output (width, height)
    frames: int
    image: str | None  # input image path (i2v / ti2v)
    vae: Any  # renderer.vae.WanVAE: encodes the conditioning image
    device: torch.device
    model_config: Any  # the family's model config (patch size, dims)
    shot: Any = None  # the resolved renderer.pipeline.ShotSpec (a family's own inputs: pose / face videos, ...)


@dataclass(frozen=True)
class FamilySpec:
    name: str                                   # what presets write in `family:`
    description: str
    tasks: tuple[str, ...]                      # every task some preset of this family may offer
    config_from_dict: Callable[[dict[str, Any]], Any]   # preset `dit:` block / config.json -> the model config
    model_cls: type                             # the plain-PyTorch model (one expert)
    build_model: Callable[..., Any]             # (config, dtype, device, seed) -> model with random weights
    # checkpoint layout -> key renamer onto our module names ("official" keys are ours already)
    key_maps: dict[str, Callable[[str], str]] = field(default_factory=dict)
    keeps_fp32: Callable[[str], bool] = lambda name: False  # parameters kept in fp32 at any render dtype
    sp_plan: SequenceParallelPlan | None = None  # None: the family cannot be split over ranks
    # task -> builder of that task's Conditioner from a shot (the pipeline has no task branches)
    conditioners: dict[str, Callable[[ShotInputs], Conditioner]] = field(default_factory=dict)
    # task -> the presets' input rules: does it need / accept an input image
    needs_image: tuple[str, ...] = ()
    accepts_image: tuple[str, ...] = ()
    # size: auto -> (width, height) from (task, image width, image height, max_area, vae stride, patch size)
    auto_size: Callable[..., tuple[int, int]] | None = None
    # what an empty negative prompt means (the official default for the family); recorded in the sidecar
    default_negative_prompt: str = ""
    # a family whose shots are not one denoise (Animate: chained clips) renders `generate` itself:
    # (composed config, preset, RenderOptions, group_factory) -> exit code; group_factory() forms the torchrun
    # render group, called only after the shot's inputs passed their checks
    generate: Callable[..., int] | None = None
