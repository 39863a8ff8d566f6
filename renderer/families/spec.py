"""What a model family declares about itself (a spec, in the manner of torchtitan's model specs).

A family is one package under renderer/families/ exposing `SPEC: FamilySpec`. Everything outside the package
(presets, the loader, the pipeline, the parallel layer) asks the spec instead of knowing the family.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


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
