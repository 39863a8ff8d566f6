"""Typed settings, built once from the Hydra config: the one place the config becomes Python objects.

    cfg = compose(["model=t2v_a14b", "prompt=..."])      # Hydra composes conf/ (the only YAML reader of conf/)
    settings = Settings.from_config(cfg)                 # the one conversion; every problem named at once

The CLI, the farm, the benchmarks and the nightly take these objects (or `compose` for their own config
groups), never the raw config. Each section is the dataclass its consumer already uses: the shot
(renderer.pipeline.ShotSpec), the model preset (renderer.presets.ModelPreset), the render options with their
KernelSettings (renderer.pipeline.RenderOptions), the parallel layout (renderer.parallel.ParallelConfig), the
farm's job and cluster settings.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from kernels.settings import KernelSettings
from renderer.parallel.config import ParallelConfig
from renderer.pipeline import RenderOptions, ShotSpec
from renderer.conf import compose  # noqa: F401 (the compose step of the config path)
from renderer.delivery import DeliverySettings
from renderer.prompts import PromptError, resolve_prompt
from renderer.presets import ModelPreset, load_preset


class SettingsError(ValueError):
    """Config values that cannot become settings; `problems` lists (field, message with the fix)."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{f}: {m}" for f, m in problems))


def to_plain(node: Any) -> Any:
    """A config node as plain dicts/lists (resolved); plain values pass through."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


@dataclass(frozen=True)
class JobSettings:
    """The farm's knobs (conf/job/default.yaml)."""

    max_retries: int = 2
    shot_timeout_s: float = 3600.0
    group_start_timeout_s: float = 900.0
    node_failure_limit: int = 2
    max_preemptions: int = 5  # lost groups a shot may suffer outside max_retries (jobs/faults.py)
    lock_wait_s: float = 0.0  # another job holds the output folder: wait this long, 0 refuses (jobs/lock.py)
    output_root: str | None = None
    force: bool = False
    max_groups: int | None = None
    live_progress: bool | None = None
    priorities: dict[str, int] = field(default_factory=dict)
    shot_defaults: dict[str, Any] = field(default_factory=dict)
    tiers: list[str] | None = None  # e.g. [draft, exact]: every shot in each quality tier, drafts first
    gpu_hour_cost: float | None = None  # accounting: money per GPU-hour (jobs/report.py)
    budget_gpu_hours: float | None = None  # no new shot starts past this many GPU-hours (jobs/scheduler.py)


@dataclass(frozen=True)
class ClusterSettings:
    """Where the farm runs (conf/cluster/*.yaml)."""

    kind: str = "local"
    address: str | None = None
    num_gpus: int | None = None
    num_cpus: int | None = None
    dashboard: bool = True


def _dataclass_from(cls, d: dict[str, Any] | None, section: str, problems: list[tuple[str, str]]):
    d = dict(d or {})
    known = {f.name for f in fields(cls)}
    for k in sorted(set(d) - known):
        problems.append((f"{section}.{k}", f"unknown setting: known are {', '.join(sorted(known))}"))
    return cls(**{k: v for k, v in d.items() if k in known})


def render_options(render: dict[str, Any], kernels: KernelSettings) -> RenderOptions:
    """The `render` section (and the kernel settings) as RenderOptions."""
    return RenderOptions(device=str(render.get("device", "auto")), kernels=kernels,
                         placement=str(render.get("placement", "auto")), t5_cpu=bool(render.get("t5_cpu", False)),
                         vae_tile=render.get("vae_tile"), progress=bool(render.get("progress", True)),
                         random_weights=bool(render.get("random_weights", False)),
                         noise_device=str(render.get("noise_device", "cpu")))


@dataclass(frozen=True)
class Settings:
    model: ModelPreset
    shot: ShotSpec
    render: RenderOptions  # with render.kernels
    parallel: ParallelConfig | None  # None: no `parallel` node (one GPU, or ulysses over a torchrun group)
    job: JobSettings
    cluster: ClusterSettings
    out: str = "out"
    name: str | None = None
    label: bool = False
    manifest: str | None = None
    dry_run: bool = False
    prepare: Any = None  # renderer.prepare.PrepareSettings: Animate preprocessing (wanrender prepare, farm stage)
    resolved: dict[str, Any] = field(default_factory=dict)  # the composed config, for config.yaml / sidecars
    quality: Any = None  # renderer.tiers.TierSettings (conf/quality/, `quality=draft quality.steps=6`)
    prompt_fields: dict | None = None  # a structured prompt's fields (renderer/prompts.py); None for plain text
    delivery: DeliverySettings = field(default_factory=DeliverySettings)  # label, safety gate, signing, tier

    @property
    def kernels(self) -> KernelSettings:
        return self.render.kernels

    @classmethod
    def from_config(cls, cfg) -> "Settings":
        """The one conversion. Raises SettingsError naming every bad field."""
        d = to_plain(cfg)
        problems: list[tuple[str, str]] = []
        try:
            model = load_preset(d["model"])
        except (ValueError, TypeError, KeyError) as e:
            raise SettingsError([("model", str(e))]) from e
        try:
            kernels = KernelSettings.from_dict(d.get("kernels"))
        except (ValueError, TypeError) as e:
            problems.append(("kernels", str(e)))
            kernels = KernelSettings()
        try:
            render = render_options(d.get("render") or {}, kernels)
        except (ValueError, TypeError) as e:
            problems.append(("render", str(e)))
            render = RenderOptions(kernels=kernels)
        parallel = None
        if d.get("parallel") is not None:
            try:
                parallel = ParallelConfig.from_dict(d["parallel"])
            except (ValueError, TypeError) as e:
                problems.append(("parallel", str(e)))
        from renderer.tiers import TierError, TierSettings, tier_from_dict

        try:
            quality = tier_from_dict(d["quality"]) if d.get("quality") else TierSettings()
        except TierError as e:
            problems.append(("quality", str(e)))
            quality = TierSettings()
        job = _dataclass_from(JobSettings, d.get("job"), "job", problems)
        cluster = _dataclass_from(ClusterSettings, d.get("cluster"), "cluster", problems)
        g = d.get("guidance")
        if g is not None and not isinstance(g, (int, float)):
            g = tuple(float(v) for v in g)
        try:
            prompt, prompt_fields = resolve_prompt(d.get("prompt"))
        except PromptError as e:
            problems.append((f"prompt.{e.field}", str(e)))
            prompt, prompt_fields = "", None
        shot = ShotSpec(prompt=prompt, task=d.get("task"), negative_prompt=d.get("negative_prompt"),
                        image=d.get("image"), size=None if d.get("size") is None else str(d["size"]),
                        frames=d.get("frames"), steps=d.get("steps"), seed=d.get("seed", 0), guidance=g,
                        sampler=d.get("sampler") or "unipc", shift=d.get("shift"), shot_id=d.get("name") or "shot")
        prepare = None
        if d.get("prepare") is not None:
            from renderer.prepare.errors import PrepareError
            from renderer.prepare.settings import PrepareSettings

            try:
                prepare = PrepareSettings.from_config(d["prepare"])
            except PrepareError as e:
                problems.append(("prepare", str(e)))
        if problems:
            raise SettingsError(problems)
        return cls(model=model, shot=shot, prepare=prepare, render=render, parallel=parallel, job=job,
                   cluster=cluster,
                   out=str(d.get("out") or "out"), name=d.get("name"), label=bool(d.get("label", False)),
                   manifest=d.get("manifest"), dry_run=bool(d.get("dry_run", False)), resolved=d, quality=quality,
                   prompt_fields=prompt_fields, delivery=DeliverySettings.from_plain(d))

    def output_root(self) -> Path:
        return Path(str(self.job.output_root or self.out))
