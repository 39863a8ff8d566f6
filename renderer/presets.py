"""Model presets (conf/model/*.yaml) as checked dataclasses, and the checks a shot must pass before compute.

A preset says what a model can do (tasks, sizes, frame counts) and how it samples (experts, boundary, shift,
steps, guidance). Every check that can fail on user input lives here, so the CLI and the render farm give the
same message — naming the field and the fix — before any GPU is reserved.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from renderer.conf import CONF_DIR, group_names, group_option  # noqa: F401 (CONF_DIR: API)
from renderer.families import get_family



def all_tasks() -> tuple[str, ...]:
    """Every task some registered family can do (the families declare them, renderer/families)."""
    from renderer.families import family_names

    return tuple(dict.fromkeys(t for name in family_names() for t in get_family(name).tasks))


def default_task(preset: "ModelPreset", image: str | None) -> str:
    """A shot without `task`: with an image, the preset's first task that takes one; else its first task."""
    if image:
        accepts = get_family(preset.family).accepts_image
        for task in preset.tasks:
            if task in accepts:
                return task
    return preset.tasks[0]


@dataclass(frozen=True)
class VAESpec:
    version: str = "2.1"
    z_dim: int = 16
    stride: tuple[int, int, int] = (4, 8, 8)
    tiny: bool = False


@dataclass(frozen=True)
class ModelPreset:
    name: str
    family: str  # a package under renderer/families/ (renderer.families.get_family)
    tasks: tuple[str, ...]
    dit: Any  # the family's model config (wan22: DiTConfig)
    experts: tuple[str | None, ...]
    boundary: float | None
    shift: float
    steps: int
    guidance: tuple[float, float]  # (low-noise expert, high-noise expert); one model uses guidance[1]
    vae: VAESpec
    text_encoder: str
    fps: int
    frames: int
    size: str
    sizes: tuple[str, ...]
    checkpoint: str | None = None
    seed_weights: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def two_experts(self) -> bool:
        return len(self.experts) == 2

    @property
    def is_tiny(self) -> bool:
        return self.text_encoder == "tiny"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelPreset":
        d = dict(d)
        known = set(cls.__dataclass_fields__) - {"extra"}
        extra = {k: d.pop(k) for k in list(d) if k not in known}
        family = get_family(str(d.get("family") or _missing("family", d)))
        unknown = [t for t in d["tasks"] if t not in family.tasks]
        if unknown:
            raise ValueError(f"model preset {d['name']}: family {family.name} has no task {', '.join(unknown)} "
                             f"(it has {', '.join(family.tasks)})")
        g = d.get("guidance", (5.0, 5.0))
        guidance = (float(g), float(g)) if isinstance(g, (int, float)) else (float(g[0]), float(g[1]))
        return cls(
            name=d["name"], family=family.name, tasks=tuple(d["tasks"]), dit=family.config_from_dict(dict(d["dit"])),
            experts=tuple(d.get("experts") or [None]), boundary=d.get("boundary"), shift=float(d["shift"]),
            steps=int(d["steps"]), guidance=guidance, vae=VAESpec(**{**dict(d["vae"]),
                                                                     "stride": tuple(d["vae"]["stride"])}),
            text_encoder=d.get("text_encoder", "umt5_xxl"), fps=int(d["fps"]), frames=int(d["frames"]),
            size=str(d["size"]), sizes=tuple(str(s) for s in d["sizes"]), checkpoint=d.get("checkpoint"),
            seed_weights=int(d.get("seed_weights", 0)), extra=extra)


def _missing(key: str, d: dict[str, Any]) -> Any:
    name = d.get("name", "?")
    raise ValueError(f"model preset {name} has no `{key}:`: add it to conf/model/{name}.yaml")


def preset_names() -> list[str]:
    return group_names("model")


def load_preset(name_or_cfg: str | dict[str, Any]) -> ModelPreset:
    """A preset by name (conf/model/<name>.yaml, composed by Hydra) or from an already-composed `model` node."""
    if not isinstance(name_or_cfg, str):
        from omegaconf import DictConfig, OmegaConf

        d = OmegaConf.to_container(name_or_cfg, resolve=True) if isinstance(name_or_cfg, DictConfig) else name_or_cfg
        return ModelPreset.from_dict(d)
    return ModelPreset.from_dict(group_option("model", name_or_cfg))


def parse_size(size: str) -> tuple[int, int]:
    """'1280*720' -> (width 1280, height 720). Raises ValueError on anything else."""
    parts = str(size).lower().replace("x", "*").split("*")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"size {size!r} is not WIDTH*HEIGHT")
    return int(parts[0]), int(parts[1])


def preset_limits(preset: ModelPreset) -> dict[str, float]:
    """Upper bounds on a shot's numbers for this model. A preset may set its own (max_steps, max_frames,
    max_guidance, max_shift in its YAML); the defaults allow four times the trained clip length, far more steps than
    any sampler needs (the official schedules use 40-50), and guidance/shift well past any useful value: a number
    beyond them is a typo that would otherwise book GPUs for hours or render noise."""
    x = preset.extra
    return {"steps": int(x.get("max_steps", 200)), "frames": int(x.get("max_frames", 4 * (preset.frames - 1) + 1)),
            "guidance": float(x.get("max_guidance", 30.0)), "shift": float(x.get("max_shift", 100.0))}


def _number_problems(preset: ModelPreset, frames: Any, steps: Any, guidance: Any, shift: Any) -> list[tuple[str, str]]:
    """Finite and within the preset's limits (NaN guidance renders a flat grey clip and poisons the JSON)."""
    limits = preset_limits(preset)
    out: list[tuple[str, str]] = []
    for name, value in (("guidance", guidance), ("shift", shift)):
        if value is None:
            continue
        vals = value if isinstance(value, (list, tuple)) else [value]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in vals):
            out.append((name, f"{name} must be a finite number, got {value!r}: e.g. {preset.guidance[1]:g}"
                        if name == "guidance" else f"{name} must be a finite number, got {value!r}: e.g. "
                                                   f"{preset.shift:g}"))
        elif any(v > limits[name] for v in vals):
            big = max(vals)
            out.append((name, f"{name} {big:g} is above {preset.name}'s limit of {limits[name]:g}: the preset uses "
                              f"{preset.guidance[1] if name == 'guidance' else preset.shift:g}"))
    for name, value in (("steps", steps), ("frames", frames)):
        if isinstance(value, int) and not isinstance(value, bool) and value > limits[name]:
            out.append((name, f"{name} {value} is above {preset.name}'s limit of {limits[name]}: the preset uses "
                              f"{preset.steps if name == 'steps' else preset.frames}"))
    return out


def auto_size_of(preset: "ModelPreset", task: str, image: str | None) -> str | None:
    """size: auto -> "W*H" from the image's aspect ratio and the area of the preset's default size (the official
    max_area); None when there is no readable image."""
    family = get_family(preset.family)
    if not image or family.auto_size is None:
        return None
    from renderer.video_io import open_rgb

    try:
        w, h = open_rgb(image).size  # as the conditioning frame will see it (EXIF rotation applied)
    except (OSError, ValueError):  # a missing or unreadable image: check_shot reports it with its fix
        return None
    dw, dh = parse_size(preset.size)
    ow, oh = family.auto_size(task, w, h, dw * dh, preset.vae.stride, preset.dit.patch_size)
    return f"{ow}*{oh}"


def size_multiple(preset: "ModelPreset") -> tuple[int, int]:
    """Output width / height must be multiples of these (VAE stride × patch size)."""
    return preset.vae.stride[2] * preset.dit.patch_size[2], preset.vae.stride[1] * preset.dit.patch_size[1]


def check_shot(preset: ModelPreset, task: str, size: str, frames: int, steps: int,
               prompt: str | None, image: str | None, sampler: str | None = None,
               seed: Any = 0, *, guidance: Any = None, shift: Any = None) -> list[tuple[str, str]]:
    """Every problem with a shot's settings for this model, as (field, message with the fix). Empty = fine.

    sampler=None skips the sampler check (the manifest validator checks it with a suggestion of its own)."""
    problems: list[tuple[str, str]] = _number_problems(preset, frames, steps, guidance, shift)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < -1 or seed > 2**63 - 1:
        problems.append(("seed", f"seed must be an integer from 0 to 2^63-1, or -1 for a random one; got {seed!r}"))
    if sampler is not None:
        from renderer.sampling import SAMPLER_NAMES

        if sampler not in SAMPLER_NAMES:
            problems.append(("sampler", f"unknown sampler {sampler!r}: use one of {', '.join(SAMPLER_NAMES)}"))
    tasks = all_tasks()
    if task not in tasks:
        problems.append(("task", f"unknown task {task!r}: use one of {', '.join(tasks)}"))
    elif task not in preset.tasks:
        problems.append(("task", f"model {preset.name} cannot do {task!r}: it does {', '.join(preset.tasks)}"))
    takes_image = task in get_family(preset.family).accepts_image
    if str(size) == "auto":
        if not takes_image or not image:
            problems.append(("size", f"size auto derives the size from an input image: give image=... (task "
                                     f"i2v/ti2v) or a size, one of {', '.join(preset.sizes)}"))
    else:
        try:
            w, h = parse_size(size)
            mw, mh = size_multiple(preset)
            # image tasks take any size on the latent grid (size auto derives one from the image, as official)
            free = takes_image and image and w % mw == 0 and h % mh == 0 and w > 0 and h > 0
            if str(size).replace("x", "*") not in preset.sizes and not free:
                extra = f", or with an input image any multiple of {mw}×{mh} (or auto)" if takes_image else ""
                problems.append(("size", f"model {preset.name} does not support size {size}: use one of "
                                         f"{', '.join(preset.sizes)}{extra}"))
        except ValueError as e:
            problems.append(("size", f"{e}: use one of {', '.join(preset.sizes)}"))
    if not isinstance(frames, int) or isinstance(frames, bool) or frames < 1 or (frames - 1) % 4:
        near = max(1, (int(frames) - 1) // 4 * 4 + 1) if isinstance(frames, int) else preset.frames
        problems.append(("frames", f"frames must be 4n+1 (e.g. {near} or {near + 4}); got {frames!r}"))
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        problems.append(("steps", f"steps must be a positive integer; got {steps!r}"))
    if prompt is None or not str(prompt).strip():
        problems.append(("prompt", "the prompt is empty: write what the shot shows"))
    if task in get_family(preset.family).needs_image and not image:
        problems.append(("image", f"task {task} needs an input image: set image to a PNG/JPEG path"))
    if image:
        p = Path(image)
        if not p.is_file():
            problems.append(("image", f"input image {image} does not exist: check the path"))
        else:
            try:
                from PIL import Image

                with Image.open(p) as im:
                    im.load()  # decodes every pixel: a truncated JPEG passes verify() but fails here
            except Exception as e:
                problems.append(("image", f"input image {image} cannot be read ({type(e).__name__}): "
                                          f"give a PNG or JPEG file"))
    return problems
