"""Quality tiers: `quality: exact | fast | draft`, each a named bundle of settings from conf/quality/<name>.yaml.

    exact  the model preset's official sampling, bf16, no cache — the only tier that makes finals;
    fast   the exact weights and schedule with fewer FLOPs: step cache + FP8 linears (lossy);
    draft  Wan2.2-Lightning LoRAs merged, 4 Euler steps on the Lightning schedule, shift 5, no CFG; Animate
           shots take the Wan2.1-I2V 4-step LoRA instead (the tier's `families.animate` fields, `for_family`).

A tier fixes the sampling fields it names (a draft with 40 steps is no longer a draft); the user overrides a
tier's own fields (`quality.steps=6`, `quality.cache.threshold=0.05`), and the shot's values apply where the tier
names none (exact names none). The tier and all its settings go into the sidecar and the render hash
(`describe()`), and non-exact renders get their own output name (`output_stem`), so a draft never overwrites
or passes for the final of the same shot.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger("wanrender.tiers")

TIER_NAMES = ("exact", "fast", "draft")
TIER_DIR = Path(__file__).resolve().parents[1] / "conf" / "quality"
CACHE_METHODS = ("none", "auto", "fbcache", "schedule")
LINEAR_MODES = ("bf16", "fp8")
LORA_EXPERTS = ("all", "high", "low")


# where the published distilled LoRA files live (the fix in a message that asks for quality.lora_dir)
_EXAMPLE_DIRS = {"high_noise_model.safetensors": "/ckpt/Wan2.2-Lightning/Wan2.2-T2V-A14B-4steps-lora-rank64-Seko-V1",
                 "lightx2v_I2V_14B_480p_cfg_step_distill_rank64_bf16.safetensors": "/ckpt/Kijai/WanVideo_comfy/Lightx2v"}


class TierError(ValueError):
    """A tier setting that cannot work; the message names the field and the fix."""


@dataclass(frozen=True)
class TierLora:
    file: str  # absolute, or relative to the tier's lora_dir
    scale: float = 1.0
    expert: str = "all"  # all | high (experts[0]) | low (experts[1])


@dataclass(frozen=True)
class CacheSettings:
    """The step cache (renderer/cache.py). fbcache: a step reuses the last residual of the blocks after the first
    when the first block's output moved less than `threshold` (relative L1) since the last full step; schedule:
    a calibrated list of the steps to compute (benchmarks.calibrate_cache, renderer.cache_schedules); auto: the
    published MagCache calibration of the model with its authors' settings where there is one (the Wan2.2 T2V-A14B,
    I2V-A14B, TI2V-5B: renderer/cache_schedules.py), else fbcache with the fields below."""

    method: str = "none"
    threshold: float = 0.0
    warmup: int = 1  # steps computed in full at the start of each expert's segment
    max_skips: int = 2  # cached steps in a row at most
    schedule: str | None = None  # json file from benchmarks.calibrate_cache (method: schedule)


@dataclass(frozen=True)
class TierSettings:
    name: str = "exact"
    steps: int | None = None
    sampler: str | None = None
    shift: float | None = None
    guidance: float | tuple[float, float] | None = None
    lora_dir: str | None = None
    loras: tuple[TierLora, ...] = ()
    lora_mode: str = "merged"
    cache: CacheSettings = field(default_factory=CacheSettings)
    linear: str = "bf16"  # bf16 | fp8 (kernels/fp8.py)
    attention: str | None = None  # None: render.attention; a lossy backend needs allow_lossy
    allow_lossy: bool = False  # lossy kernels (fp8 attention) may be chosen, by name or by autotune
    # {family: {field: value}}: the tier's fields for one model family (draft: Animate's own LoRA file); applied by
    # for_family, so the sidecar and the hash record what the shot really ran with
    families: dict = field(default_factory=dict)

    @property
    def is_final(self) -> bool:
        return self.name == "exact"

    @property
    def lossless(self) -> bool:
        return self.linear == "bf16" and self.cache.method == "none" and not self.loras and self.steps is None

    def describe(self) -> dict[str, Any]:
        """Everything that changes the pixels: for the sidecar and the render hash."""
        d = asdict(self)
        d["loras"] = [asdict(l) | {"path": str(p)} for l, p in zip(self.loras, self.lora_paths())]
        d.pop("families")  # another family's fields change nothing here; for_family resolves a family's own
        return d

    def kernel_settings(self, k):
        """KernelSettings `k` with this tier's attention backend and lossy permission (what the pipeline runs and
        the render hash records: the farm's plan and the sidecar must agree)."""
        return replace(k, attention=self.attention or k.attention, allow_lossy=k.allow_lossy or self.allow_lossy)

    def with_kernels(self, options):
        """RenderOptions whose kernel settings carry this tier's attention backend and lossy permission."""
        kernels = self.kernel_settings(options.kernels)
        return options if kernels == options.kernels else replace(options, kernels=kernels)

    def for_family(self, family: str) -> "TierSettings":
        """This tier as a shot of `family` renders it: the family's fields (families.<family>) over the common ones.
        The result names no families (what ran is fully in its own fields)."""
        d = asdict(self)
        own = d.pop("families").get(family) or {}
        d["loras"] = [asdict(l) for l in self.loras]
        return tier_from_dict(_merge(d, own) | {"name": self.name})

    # -- shots --------------------------------------------------------------------------------------------------
    def apply(self, shot):
        """A renderer.pipeline.ShotSpec with this tier's sampling fields (the tier wins where it names a value)."""
        changes: dict[str, Any] = {}
        for f in ("steps", "sampler", "shift", "guidance"):
            v = getattr(self, f)
            if v is not None:
                changes[f] = v
        return replace(shot, **changes) if changes else shot

    def output_stem(self, name: str) -> str:
        """exact renders keep the shot's name; the others get a suffix, so they never replace a final."""
        return name if self.is_final else f"{name}.{self.name}"

    # -- LoRAs --------------------------------------------------------------------------------------------------
    def lora_paths(self) -> list[Path]:
        base = Path(self.lora_dir) if self.lora_dir else None
        return [Path(l.file) if Path(l.file).is_absolute() or base is None else base / l.file for l in self.loras]

    def loras_per_expert(self, num_experts: int, random_weights: bool) -> list[list[tuple[Path, float]]]:
        """[(path, scale), ...] for each expert. Without a lora_dir, random-weight models (tiny, benchmarks) run
        the tier's schedule without the distilled LoRAs — speed does not depend on them; a real checkpoint
        cannot (its 4-step output would be noise)."""
        if not self.loras:
            return [[] for _ in range(num_experts)]
        if self.lora_dir is None and not any(Path(l.file).is_absolute() for l in self.loras):
            if random_weights:
                log.warning("tier %s: no quality.lora_dir; random weights render its schedule without the LoRAs",
                            self.name)
                return [[] for _ in range(num_experts)]
            raise TierError(f"tier {self.name}: quality.lora_dir is not set: point it at the folder of the distilled "
                            f"LoRA files ({', '.join(l.file for l in self.loras)}), e.g. "
                            f"quality.lora_dir={_EXAMPLE_DIRS.get(self.loras[0].file, '<folder>')}")
        missing = [str(p) for p in self.lora_paths() if not p.is_file()]
        if missing:
            raise TierError(f"tier {self.name}: LoRA file(s) not found: {', '.join(missing)}: check quality.lora_dir "
                            f"and quality.loras")
        out: list[list[tuple[Path, float]]] = [[] for _ in range(num_experts)]
        for lora, path in zip(self.loras, self.lora_paths()):
            if lora.expert == "all":
                targets = range(num_experts)
            elif num_experts == 1:
                raise TierError(f"tier {self.name}: LoRA {lora.file} is for the {lora.expert}-noise expert but the "
                                f"model has one expert: give it expert: all")
            else:
                targets = [0 if lora.expert == "high" else 1]
            for i in targets:
                out[i].append((path, lora.scale))
        return out


def _check(t: TierSettings) -> list[tuple[str, str]]:
    """(field, problem and fix) for every bad setting."""
    from renderer.sampling import SAMPLER_NAMES

    p = []
    if t.steps is not None and (not isinstance(t.steps, int) or t.steps < 1):
        p.append(("quality.steps", f"{t.steps!r} is not a positive whole number of steps"))
    if t.sampler is not None and t.sampler not in SAMPLER_NAMES:
        p.append(("quality.sampler", f"unknown sampler {t.sampler!r}: use one of {', '.join(SAMPLER_NAMES)}"))
    if t.shift is not None and not t.shift > 0:
        p.append(("quality.shift", f"{t.shift!r} must be > 0"))
    if t.lora_mode not in ("merged", "unmerged"):
        p.append(("quality.lora_mode", f"{t.lora_mode!r}: use merged or unmerged"))
    for i, l in enumerate(t.loras):
        if l.expert not in LORA_EXPERTS:
            p.append((f"quality.loras[{i}].expert", f"{l.expert!r}: use one of {', '.join(LORA_EXPERTS)}"))
    c = t.cache
    if c.method not in CACHE_METHODS:
        p.append(("quality.cache.method", f"{c.method!r}: use one of {', '.join(CACHE_METHODS)}"))
    if c.threshold < 0:
        p.append(("quality.cache.threshold", f"{c.threshold} must be >= 0 (0 computes every step)"))
    if c.warmup < 1 or c.max_skips < 0:
        p.append(("quality.cache", f"warmup {c.warmup} must be >= 1 and max_skips {c.max_skips} >= 0"))
    if c.method == "schedule" and not (c.schedule and Path(c.schedule).is_file()):
        p.append(("quality.cache.schedule", f"method schedule needs a schedule file ({c.schedule} is not one): run "
                                            f"python -m benchmarks.calibrate_cache and set quality.cache.schedule=<json>"))
    if t.linear == "fp8" and t.lora_mode == "unmerged" and t.loras:
        p.append(("quality.lora_mode", "unmerged LoRAs cannot be combined with quality.linear=fp8 (the FP8 swap would "
                                       "drop their side path): use quality.lora_mode=merged"))
    if t.linear not in LINEAR_MODES:
        p.append(("quality.linear", f"{t.linear!r}: use one of {', '.join(LINEAR_MODES)}"))
    lossy = t.linear != "bf16" or c.method != "none" or (t.attention or "").startswith("fp8")
    if lossy and not t.allow_lossy:
        p.append(("quality.allow_lossy", f"tier {t.name} uses lossy settings (linear={t.linear}, cache={c.method}, "
                                      f"attention={t.attention}): set quality.allow_lossy=true or drop them"))
    if t.name == "exact" and not t.lossless:
        p.append(("quality", "the exact tier cannot change steps, LoRAs, cache or precision (it makes finals): "
                             "use quality=fast or quality=draft for that"))
    return p


def tier_from_dict(d: dict[str, Any]) -> TierSettings:
    d = dict(d)
    unknown = set(d) - set(TierSettings.__dataclass_fields__)
    if unknown:
        raise TierError(f"tier {d.get('name')}: unknown field(s) {', '.join(sorted(unknown))}: valid fields are "
                        f"{', '.join(TierSettings.__dataclass_fields__)}")
    cache = dict(d.pop("cache", None) or {})
    bad = set(cache) - set(CacheSettings.__dataclass_fields__)
    if bad:
        raise TierError(f"quality.cache: unknown field(s) {', '.join(sorted(bad))}: valid fields are "
                        f"{', '.join(CacheSettings.__dataclass_fields__)}")
    loras = []
    for i, l in enumerate(d.pop("loras", None) or []):
        if isinstance(l, str):
            l = {"file": l}
        if not isinstance(l, dict) or "file" not in l:
            raise TierError(f"quality.loras[{i}]: give {{file: <path>, scale: 1.0, expert: all|high|low}}, got {l!r}")
        loras.append(TierLora(**{k: l[k] for k in ("file", "scale", "expert") if k in l}))
    g = d.get("guidance")
    if isinstance(g, (list, tuple)):
        d["guidance"] = (float(g[0]), float(g[1]))
    families = d.pop("families", None) or {}
    if not isinstance(families, dict):
        raise TierError(f"quality.families: give {{family: {{field: value}}}}, got {families!r}")
    valid = [f for f in TierSettings.__dataclass_fields__ if f not in ("families", "name")]
    for fam, fields in families.items():
        if not isinstance(fields or {}, dict):
            raise TierError(f"quality.families.{fam}: give {{field: value}} of the tier, got {fields!r}")
        bad = sorted(set(fields or {}) - set(valid))
        if bad:
            raise TierError(f"quality.families.{fam}: unknown field(s) {', '.join(bad)}: valid fields are "
                            f"{', '.join(valid)}")
    tier = TierSettings(**d, cache=CacheSettings(**cache), loras=tuple(loras), families=dict(families))
    problems = _check(tier)
    if problems:
        raise TierError("; ".join(f"{f}: {m}" for f, m in problems))
    return tier


def _merge(base: dict, new: dict) -> dict:
    out = dict(base)
    for k, v in new.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_tier(name: str | None, overrides: dict[str, Any] | None = None) -> TierSettings:
    """conf/quality/<name>.yaml with `overrides` (a dict of the tier's fields, nested for cache) merged on top.
    Plain PyYAML: the benchmark workers run it on GPU machines without Hydra/OmegaConf."""
    import yaml

    name = name or "exact"
    if name not in TIER_NAMES:
        raise TierError(f"quality {name!r}: use one of {', '.join(TIER_NAMES)}")
    d = _merge(yaml.safe_load((TIER_DIR / f"{name}.yaml").read_text()), dict(overrides or {}))
    d["name"] = name
    return tier_from_dict(d)


def order_by_tier(items: Sequence[Any], tiers: Sequence[str], key=lambda item, tier: (item, tier)) -> list[Any]:
    """Farm workflow `job.tiers: [draft, exact]`: every item in the first tier before any in the next."""
    for t in tiers:
        if t not in TIER_NAMES:
            raise TierError(f"job.tiers: {t!r} is not a tier: use {', '.join(TIER_NAMES)}")
    return [key(item, t) for t in tiers for item in items]


def prepare_experts(experts: list, tier: TierSettings, random_weights: bool, stage: str):
    """What a tier does to the loaded experts, in two stages around parallelisation:

    stage "weights" (before FSDP / streaming): LoRAs merged or attached per expert, then the FP8 swap (after the
    merge, so the quantised weight includes the LoRA);
    stage "runtime" (after parallelisation): one step cache per expert, deciding over the whole render group (the
    default process group of a group's ranks: under torchrun and in a farm group alike).
    Returns the experts ("weights") or the step caches ("runtime")."""
    if stage == "weights":
        from renderer.lora import apply_loras, load_lora

        for expert, files in zip(experts, tier.loras_per_expert(len(experts), random_weights)):
            if files:
                apply_loras(expert, [(load_lora(p), s) for p, s in files], tier.lora_mode)
        if tier.linear == "fp8":
            from kernels.fp8 import convert_to_fp8

            for expert in experts:
                convert_to_fp8(expert)
        return experts
    if stage == "runtime":
        from renderer.cache import install_step_caches

        return install_step_caches(experts, tier.cache)
    raise ValueError(f"prepare_experts: stage {stage!r}")
