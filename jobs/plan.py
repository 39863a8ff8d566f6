"""From validated shots to a render plan: resolved settings, render hashes, what is already done, the priority queue
and a time estimate. Nothing here touches Ray or a GPU, so `dry_run=true` is exactly this module's output.

A shot counts as done only when all of these hold (anything less is re-rendered, never trusted):
  * <out>/<output>.mp4 exists and decodes with the shot's frame count and size (a truncated file fails here),
  * its sidecar <out>/<output>.json exists, parses, and carries the same render_hash as the shot would now get
    (write_shot writes the sidecar last, so an MP4 without a sidecar is an interrupted write).
"""
from __future__ import annotations

import heapq
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path

from jobs.manifest import Manifest, ShotRequest
from kernels.settings import KernelSettings
from renderer.output import render_hash
from renderer.pipeline import ShotSpec
from renderer.presets import ModelPreset, parse_size


@dataclass
class PlannedShot:
    request: ShotRequest
    spec: ShotSpec  # resolved against the model preset: exactly what the render group gets
    render_hash: str
    mp4: Path
    done: bool
    reason: str  # why it renders ("new", "settings changed", ...) or "done"
    estimate_s: float = 0.0
    tier: str = "exact"  # quality tier (renderer/tiers.py); a draft of a shot is its own planned shot
    tier_rank: int = 0  # position of the tier in job.tiers: all drafts before any final

    @property
    def id(self) -> str:
        return self.request.id if self.tier == "exact" else f"{self.request.id}.{self.tier}"

    @property
    def output(self) -> str:
        """File stem under the output folder: <output>.mp4 for exact, <output>.<tier>.mp4 for the others."""
        return self.mp4.stem

    @property
    def priority(self) -> int:
        return self.request.priority


@dataclass
class Plan:
    manifest: Manifest
    model: str
    fingerprint: str
    out_dir: Path
    gpus_per_group: int
    shots: list[PlannedShot]  # priority order (highest first, then manifest order)
    estimate_basis: str = "rough cost model"
    startup_s: float = 10.0  # starting a group: worker processes, imports, model load


    @property
    def todo(self) -> list[PlannedShot]:
        return [s for s in self.shots if not s.done]

    @property
    def done(self) -> list[PlannedShot]:
        return [s for s in self.shots if s.done]

    def estimate_seconds(self, groups: int) -> float:
        """Wall time with `groups` render groups pulling from one queue (longest-first greedy bound)."""
        loads = [0.0] * max(1, groups)
        for s in sorted(self.todo, key=lambda s: -s.estimate_s):
            i = loads.index(min(loads))
            loads[i] += s.estimate_s
        return self.startup_s + max(loads) if self.todo else 0.0


def model_fingerprint(preset: ModelPreset) -> str:
    """Same identity the Pipeline computes, without loading any weights."""
    if preset.checkpoint:
        from renderer.checkpoint import fingerprint

        return fingerprint(preset.checkpoint)
    return f"random-seed{preset.seed_weights}"


def output_status(mp4: Path, expected_hash: str, spec: ShotSpec) -> tuple[bool, str]:
    """(done?, reason) for one output file; see the module docstring for what 'done' means."""
    from renderer.video_io import read_json, sidecar_path, video_info

    if not mp4.is_file():
        from renderer.safety import held_sidecar

        held = held_sidecar(mp4.parent, mp4.stem)  # the same render, held by the safety gate: not again
        if held is not None and held.get("render_hash") == expected_hash:
            return True, "held in quarantine"
        return False, "new"
    side = sidecar_path(mp4)
    if not side.is_file():
        return False, "MP4 without sidecar (interrupted write)"
    try:
        meta = read_json(side)
    except (OSError, ValueError):
        return False, "unreadable sidecar"
    if not isinstance(meta, dict) or meta.get("render_hash") != expected_hash:
        return False, "settings changed"
    try:
        info = video_info(mp4)
    except Exception:  # decord raises its own error types on a truncated or foreign file
        return False, "unreadable MP4"
    w, h = parse_size(spec.size)
    if (info["frames"], info["width"], info["height"]) != (spec.frames, w, h):
        return False, f"incomplete MP4 ({info['frames']} of {spec.frames} frames)"
    return True, "done"


def tokens_of(spec: ShotSpec, preset: ModelPreset) -> int:
    w, h = parse_size(spec.size)
    st, sh, sw = preset.vae.stride
    pt, ph, pw = preset.dit.patch_size
    return ((spec.frames - 1) // st + 1) // pt * (h // sh // ph) * (w // sw // pw)


def _passes(spec: ShotSpec) -> int:
    return 1 if all(g == 1.0 for g in spec.guidance) else 2  # CFG doubles the forwards


def rough_seconds(spec: ShotSpec, preset: ModelPreset, gpus: int) -> float:
    """A cost model for planning only. Full-size models: a·T + b·T² seconds per forward of T tokens, fitted to
    the measured A14B forwards on one H200 (3.78 s at 832×480×81, 13.22 s at 1280×720×81) and scaled by layers
    and width; groups of G GPUs at ~85% efficiency. Tiny CPU models: a fixed ~2 s per shot plus ~0.3 s a step."""
    forwards = spec.steps * _passes(spec)
    if preset.is_tiny:
        return 2.0 + 0.15 * forwards
    d = preset.dit
    t = tokens_of(spec, preset)
    linear = 6.99e-5 * t * (d.num_layers * d.dim**2) / (40 * 5120**2)
    attention = 1.388e-9 * t * t * (d.num_layers * d.dim) / (40 * 5120)
    return 30.0 + forwards * (linear + attention) / (0.85 * gpus if gpus > 1 else 1)


def measured_rate(out_dir: Path, model: str) -> float | None:
    """Median denoise seconds per (forward × token) from earlier sidecars of this model in the output folder."""
    from renderer.video_io import read_json

    rates = []
    for side in sorted(out_dir.glob("*.json"))[:200]:
        try:
            m = read_json(side)
            if m.get("model") != model:
                continue
            t = m["timings_s"]
            g = m["guidance"]
            forwards = m["steps"] * (1 if g["low_noise"] == g["high_noise"] == 1.0 else 2)
            w, h = parse_size(m["size"])
            rates.append((sum(v for k, v in t.items() if k in ("text_encode", "denoise", "vae_decode", "mp4_write")
                              and v is not None)) / max(1, forwards * w * h * m["frames"]))
        except Exception:  # a foreign or older JSON in the folder: not a timing source
            continue
    return statistics.median(rates) if len(rates) >= 2 else None


def _default_label():
    from renderer.label import LabelStyle

    return LabelStyle()


def build_plan(manifest: Manifest, preset: ModelPreset, out_dir: str | Path, *, gpus_per_group: int = 1,
               force: bool = False, kernels: KernelSettings | None = None, tiers: list[str] | None = None,
               tier_overrides: dict | None = None, label_style=None, prepare_fields: dict | None = None) -> Plan:
    """kernels: the job's KernelSettings (part of every render hash; default: the defaults).
    tiers (job.tiers, e.g. [draft, exact]): every shot in each tier, all of the first tier before any of the
    next; None: each shot in its own `quality`. tier_overrides: {tier name: {field: value}} (conf/quality fields).
    label_style: the job's renderer.label.LabelStyle; a labelled shot's hash includes it.
    prepare_fields: the preprocessing settings (PrepareSettings.cache_fields()) Animate plates are prepared with."""
    from renderer.tiers import load_tier

    kernels = kernels or KernelSettings()
    out = Path(out_dir)
    fingerprint = model_fingerprint(preset)
    rate = measured_rate(out, preset.name) if out.is_dir() else None
    planned = []
    order = list(tiers or [])
    work = [(req, t) for t in order for req in manifest.shots] if order else [(r, r.quality) for r in manifest.shots]
    for req, tier_name in work:
        tier = load_tier(tier_name, (tier_overrides or {}).get(tier_name))
        if req.clip_plan is not None:  # an Animate shot: the tier's Animate fields (a draft's own LoRA file)
            tier = tier.for_family("animate")
        spec = tier.apply(req.spec).resolve(preset)
        if not tier.is_final:  # the draft of s010 is shot "s010.draft" everywhere: queue, logs, sidecar
            spec = replace(spec, shot_id=f"{req.id}.{tier.name}")
        h = render_hash(spec, preset.name, fingerprint, tier.kernel_settings(kernels), tier.describe(),
                        (label_style or _default_label()) if req.label else None)
        if req.clip_plan is not None:  # Animate: frames / size from the plate, hash over its inputs too
            from jobs.animate_shots import plan_entry
            from renderer.tiers import TierError

            if tier.name == "fast":  # its step cache and FP8 layers are not in the Animate clip loop
                raise TierError(f"shot {req.id}: quality fast: not available for Animate shots: use quality: draft "
                                f"or exact (or drop fast from job.tiers)")
            spec, h = plan_entry(spec, req, h, prepare_fields)
        mp4 = out / f"{tier.output_stem(req.output)}.mp4"
        done, reason = output_status(mp4, h, spec)
        if force and done:
            done, reason = False, "forced (job.force=true)"
        if rate is not None:
            w, hh = parse_size(spec.size)
            est = rate * spec.steps * _passes(spec) * w * hh * spec.frames / (0.85 * gpus_per_group
                                                                              if gpus_per_group > 1 else 1)
        else:
            est = rough_seconds(spec, preset, gpus_per_group)
        planned.append(PlannedShot(req, spec, h, mp4, done, reason, est, tier.name,
                                   order.index(tier_name) if order else 0))
    planned.sort(key=lambda s: (s.tier_rank, -s.priority, s.request.index))
    return Plan(manifest, preset.name, fingerprint, out, gpus_per_group, planned,
                "earlier renders in this folder" if rate is not None else "rough cost model",
                startup_s=10.0 if preset.is_tiny else 180.0)


def format_plan(plan: Plan, groups: int | None, cluster_note: str = "") -> str:
    """The dry-run / start-of-job summary: groups, shots in priority order with their status, the estimate."""
    lines = [f"job {plan.manifest.name}: {len(plan.shots)} shots from {plan.manifest.source}, model {plan.model} "
             f"({plan.fingerprint}), output {plan.out_dir}",
             f"render groups: {plan.gpus_per_group} GPU{'s' if plan.gpus_per_group > 1 else ''} each, "
             + (f"{groups} group{'s' if groups != 1 else ''}" if groups else "as many as the cluster holds")
             + (f" ({cluster_note})" if cluster_note else "")]
    lines.append(f"  {'#':>3} {'shot':<20} {'prio':>5} {'task':<5} {'size':<10} {'frames':>6} {'steps':>5} "
                 f"{'seed':>10} {'est':>7}  status -> output")
    for i, s in enumerate(plan.shots, 1):
        sp = s.spec
        status = "done, skipped" if s.done else f"render ({s.reason})"
        lines.append(f"  {i:>3} {s.id:<20} {s.priority:>5} {sp.task:<5} {sp.size:<10} {sp.frames:>6} {sp.steps:>5} "
                     f"{sp.seed:>10} {s.estimate_s:>6.0f}s  {status} -> {s.mp4.name}")
    todo = len(plan.todo)
    eta = plan.estimate_seconds(groups or 1)
    lines.append(f"{todo} to render, {len(plan.done)} already done; estimated {format_duration(eta)} on "
                 f"{groups or 1} group{'s' if (groups or 1) != 1 else ''} ({plan.estimate_basis})")
    for p in plan.todo:  # Animate shots: the clip plan read from the plate's header, and its full-size cost
        if getattr(p.request, "clip_plan", None) is not None:
            lines.append(f"  {p.id}: {p.request.clip_plan.describe()}")
    return "\n".join(lines)


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    m, s = divmod(seconds, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


@dataclass(order=True)
class _Entry:
    sort_key: tuple
    shot_id: str = field(compare=False)


class ShotQueue:
    """The driver's priority queue: highest priority first, manifest order among equals. A retried shot goes
    back with its own priority, so a failure does not push urgent work behind the rest of the job."""

    def __init__(self, shots: list[PlannedShot]):
        self._by_id = {s.id: s for s in shots}
        self._heap: list[_Entry] = []
        for s in shots:
            self.push(s)

    def push(self, shot: PlannedShot) -> None:
        heapq.heappush(self._heap, _Entry((shot.tier_rank, -shot.priority, shot.request.index), shot.id))

    def pop(self) -> PlannedShot:
        return self._by_id[heapq.heappop(self._heap).shot_id]

    def __len__(self) -> int:
        return len(self._heap)

    def ids(self) -> list[str]:
        return [e.shot_id for e in sorted(self._heap)]
