"""`wanrender render manifest=FILE`: the render farm's driver.

    Hydra config + manifest --validate--> plan (what is done, priority order, estimate)   [no Ray, no GPU]
        --dry_run=true--> print the plan, stop
        --> Ray (embedded local cluster, or cluster=ray cluster.address=HOST:PORT)
        --> render groups (jobs/group.py) pulling from the priority queue (jobs/scheduler.py)
        --> <out>/<shot>.mp4 + sidecar, <out>/logs/, <out>/config.yaml, <out>/report.{json,html}

Exit status: 0 when every shot is rendered (or was already), 1 when any shot failed for good, 2 for bad input
(nothing reserved), 130 when interrupted.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from jobs.manifest import ManifestError, Problem, load_manifest, read_manifest, validate_manifest
from jobs.plan import Plan, build_plan, format_duration, format_plan
from renderer.safety import held_sidecar

log = logging.getLogger("wanrender.farm")
FAULTS_ENV = "WANRENDER_FAULTS"  # test hook: "crash:sh03:1,hang:sh05:1[:step]" (kind:shot:attempt[:step])


def _node(cfg: DictConfig, key: str, default: Any = None) -> Any:
    return OmegaConf.select(cfg, key, default=default)


def gpus_per_group(cfg: DictConfig) -> tuple[int, dict | None]:
    """G = parallel.cfg × parallel.ulysses × parallel.ring; no `parallel` node means one GPU per group."""
    node = _node(cfg, "parallel")
    if node is None:
        return 1, None
    d = OmegaConf.to_container(node, resolve=True)
    try:
        from renderer.parallel.config import ParallelConfig

        return ParallelConfig.from_dict(d).world_size, d
    except ImportError:  # renderer.parallel not present: read the three degrees directly
        return int(d.get("cfg", 1)) * int(d.get("ulysses", 1)) * int(d.get("ring", 1)), d


def choose_preset(cfg: DictConfig, manifest_model: Any):
    """The manifest's `model` (a preset name) when it names one, else the config's model node."""
    from renderer.presets import load_preset

    if manifest_model and manifest_model != _node(cfg, "model.name"):
        return load_preset(str(manifest_model)), f"model {manifest_model} (from the manifest)"
    return load_preset(cfg.model), f"model {cfg.model.name}"


def prepare(cfg: DictConfig) -> tuple[Plan, Any]:
    """Config + manifest -> plan. Raises ManifestError listing every problem; reserves nothing."""
    problems: list[Problem] = []
    path = _node(cfg, "manifest")
    if not path:
        raise ManifestError([Problem("manifest", "manifest", "no manifest given: wanrender render "
                                                             "manifest=examples/previs.yaml")], "config")
    raw = read_manifest(path)
    try:
        preset, _ = choose_preset(cfg, raw.get("model") if isinstance(raw, dict) else None)
    except (ValueError, TypeError, KeyError) as e:
        raise ManifestError([Problem("manifest", "model", str(e))], str(path))
    if preset.checkpoint is None and not preset.is_tiny and not _node(cfg, "render.random_weights", False):
        problems.append(Problem("manifest", "model.checkpoint", f"model {preset.name} needs its weights: "
                                                                f"model.checkpoint=/path/to/Wan2.2 folder"))
    try:
        g, _ = gpus_per_group(cfg)
        parallel = _node(cfg, "parallel")
        if parallel is not None and preset.dit.num_heads % int(parallel.get("ulysses", 1)):
            problems.append(Problem("manifest", "parallel.ulysses", f"ulysses={parallel.ulysses} does not divide "
                                                                    f"{preset.name}'s {preset.dit.num_heads} heads"))
    except (ValueError, TypeError) as e:
        problems.append(Problem("manifest", "parallel", str(e)))
    job = cfg.job
    for key, low in (("max_retries", 0), ("node_failure_limit", 1), ("shot_timeout_s", 1e-3)):
        v = _node(job, key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < low:
            problems.append(Problem("manifest", f"job.{key}", f"must be a number >= {low:g}, got {v!r}"))
    problems += accounting_problems(job)
    defaults = OmegaConf.to_container(job.shot_defaults, resolve=True) if _node(job, "shot_defaults") is not None else {}
    priorities = OmegaConf.to_container(job.priorities, resolve=True) if _node(job, "priorities") else None
    try:
        manifest = validate_manifest(raw, preset, base_dir=Path(path).resolve().parent, config_defaults=defaults,
                                     priorities=priorities, source=str(path))
    except ManifestError as e:
        problems += e.problems
    else:
        from jobs.prepare_stage import check_prepare_config  # Animate plates: preprocessing config and weights

        problems += [Problem("manifest", f, m) for f, m in check_prepare_config(cfg, manifest.shots)]
    problems += _gate_problems(cfg, manifest if not problems else None)
    if problems:
        raise ManifestError(problems, str(path))
    out = Path(str(_node(job, "output_root") or cfg.out))
    try:
        settings = job_settings(cfg)
    except ValueError as e:  # renderer.settings.SettingsError: bad kernel / render values
        raise ManifestError([Problem("config", "kernels", str(e))], str(path))
    kernels, delivery = settings.kernels, settings.delivery
    if delivery.label_all:  # the config's label=true labels every shot of the job
        from dataclasses import replace

        manifest.shots = [replace(s, label=True) for s in manifest.shots]
    from renderer.tiers import TierError

    tiers = OmegaConf.to_container(job.tiers, resolve=True) if _node(job, "tiers") is not None else None
    try:  # job.tiers names and the quality.* overrides are checked with the manifest, before Ray starts
        plan = build_plan(manifest, preset, out, gpus_per_group=g if not problems else 1, force=bool(job.force),
                          kernels=kernels, tiers=tiers, tier_overrides=tier_overrides(cfg),
                          label_style=delivery.label, prepare_fields=_prepare_fields(cfg, manifest, preset))
        for q in sorted({s.tier for s in plan.shots}):  # a draft on real weights needs its LoRA files
            _tier_loras(cfg, q, preset)
    except TierError as e:
        raise ManifestError([Problem("manifest", "quality" if "quality" in str(e) else "job.tiers", str(e))],
                            str(path)) from None
    return plan, preset


def _prepare_fields(cfg: DictConfig, manifest, preset) -> dict | None:
    """The preprocessing settings Animate plates get (part of their shots' render hashes); None without any."""
    if not any(s.clip_plan is not None for s in manifest.shots):
        return None
    from jobs.prepare_stage import settings_from
    from renderer.prepare.errors import PrepareError

    try:
        fields = settings_from(cfg).cache_fields()
    except PrepareError as e:
        raise ManifestError([Problem("manifest", "prepare", str(e))], str(cfg.manifest)) from None
    if fields["fps"] != preset.fps:  # the plate is resampled to the rate the model renders at
        raise ManifestError([Problem("manifest", "prepare.fps", f"prepare.fps={fields['fps']} but {preset.name} "
                                                                f"renders at {preset.fps} fps: remove prepare.fps "
                                                                f"or set it to {preset.fps}")], str(cfg.manifest))
    return fields


def tier_overrides(cfg: DictConfig) -> dict[str, dict]:
    """{tier name: fields}: the quality.* settings given for the tier `quality=` names (conf/quality/)."""
    node = _node(cfg, "quality")
    if node is None:
        return {}
    d = OmegaConf.to_container(node, resolve=True)
    return {d.get("name", "exact"): {k: v for k, v in d.items() if k != "name"}}


def _tier_loras(cfg: DictConfig, name: str, preset):
    from renderer.tiers import load_tier

    tier = load_tier(name, tier_overrides(cfg).get(name))
    return tier.loras_per_expert(len(preset.experts), random_weights=preset.checkpoint is None)


def _gate_problems(cfg: DictConfig, manifest) -> list[Problem]:
    """Label, signing and safety settings, and every shot's prompt through the content-safety term lists."""
    from renderer.delivery import DeliverySettings
    from renderer.gate import prompt_problems
    from renderer.safety import load_terms

    delivery = DeliverySettings.from_config(cfg)
    labelled = delivery.label_all or bool(manifest and any(s.label for s in manifest.shots))
    found = delivery.problems(labelled)
    problems = [Problem("manifest", f, m) for f, m in found]
    if manifest is not None and delivery.safety.prompt_screen and not any(f == "safety.terms_dir" for f, _ in found):
        lists = load_terms(delivery.safety.terms_dir)
        problems += [Problem(s.id, f, m) for s in manifest.shots for f, m in prompt_problems(s.spec.prompt, delivery,
                                                                                             lists)]
    if manifest is not None and not any(f.startswith("safety.") for f, _ in found):
        from renderer.gate import image_problems

        problems += [Problem(sid, "image", m) for sid, m in image_problems([(s.id, s.spec.image)
                                                                            for s in manifest.shots], delivery)]
    return problems


def accounting_problems(job: DictConfig) -> list[Problem]:
    """job.gpu_hour_cost (>= 0) and job.budget_gpu_hours (> 0): finite numbers or null."""
    import math

    problems = []
    for key, low, fix in (("gpu_hour_cost", 0.0, "job.gpu_hour_cost=2.5 (money per GPU-hour) or null"),
                          ("budget_gpu_hours", 1e-9, "job.budget_gpu_hours=10 (GPU-hours) or null for no cap")):
        v = _node(job, key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < low:
            problems.append(Problem("manifest", f"job.{key}", f"must be a finite number "
                                                              f"{'>= 0' if low == 0 else '> 0'}, got {v!r}: {fix}"))
    return problems


def planned_groups(cfg: DictConfig, plan: Plan) -> tuple[int | None, str]:
    """How many groups the job will run, guessed without starting Ray (for the dry run)."""
    cluster = cfg.cluster
    g = plan.gpus_per_group
    cap = _node(cfg, "job.max_groups")
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():  # already connected: ask Ray, it is free
        res = sys.modules["ray"].cluster_resources()
        gpus, cpus = int(res.get("GPU", 0)), int(res.get("CPU", 0))
        n = min(gpus // g, cpus // g) if gpus else cpus // g
        return min(n, cap or n, max(1, len(plan.todo))), f"connected Ray cluster: {gpus} GPUs, {cpus} CPUs"
    if cluster.kind != "local":
        return None, f"cluster at {cluster.address}"
    gpus = cluster.num_gpus
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count()
    cpus = cluster.num_cpus or os.cpu_count() or 1
    n = min(gpus // g, cpus // g) if gpus else cpus // g
    note = f"{gpus} GPUs" if gpus else f"CPU only, {cpus} cores"
    n = min(n, cap or n, max(1, len(plan.todo)))
    return max(n, 0), note


def parse_faults(text: str | None) -> dict[tuple[str, int], dict]:
    faults = {}
    for item in (text or "").split(","):
        parts = item.strip().split(":")
        if len(parts) >= 3:
            faults[(parts[1], int(parts[2]))] = {"kind": parts[0], "at_step": int(parts[3]) if len(parts) > 3 else 1}
    return faults


@contextmanager
def ray_session(cfg: DictConfig):
    """Reuse a Ray already initialised in this process (tests), else start/join one and stop it afterwards."""
    import ray

    if ray.is_initialized():
        yield _with_scheme(_dashboard_url())
        return
    cluster = cfg.cluster
    common = dict(log_to_driver=False, logging_level=logging.WARNING, configure_logging=True)
    if cluster.kind == "local":
        # address="local": always a fresh cluster of our own, never one someone else started on this machine
        ctx = ray.init(address="local", num_cpus=cluster.num_cpus, num_gpus=cluster.num_gpus,
                       include_dashboard=bool(cluster.dashboard), **common)
    else:
        ctx = ray.init(address=str(cluster.address), **common)
    try:
        yield _with_scheme(getattr(ctx, "dashboard_url", None) or _dashboard_url())
    finally:
        ray.shutdown()


def _with_scheme(url: str | None) -> str | None:
    return f"http://{url}" if url and "://" not in url else url


def _dashboard_url() -> str | None:
    try:
        import ray

        return ray._private.worker.get_dashboard_url() or None
    except Exception:  # private API: no link is better than a crash
        return None


def save_config(cfg: DictConfig, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    tmp = out / f".config.yaml.tmp-{os.getpid()}"
    tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True), encoding="utf-8")
    os.replace(tmp, path)
    return path


def worker_spec(cfg: DictConfig, preset) -> dict[str, Any]:
    options = asdict(job_settings(cfg).render)  # RenderOptions with its KernelSettings, as plain data for Ray
    options["progress"] = False  # a progress bar per actor would only clutter the shot logs
    _, parallel = gpus_per_group(cfg)
    preset_dict = OmegaConf.to_container(cfg.model, resolve=True) if preset.name == cfg.model.name else preset.name
    return {"preset": preset_dict, "options": options, "parallel": parallel, "cpu_threads": 1,
            "quality_overrides": tier_overrides(cfg),
            "delivery": job_settings(cfg).delivery.to_dict()}


def job_settings(cfg: DictConfig):
    """The typed settings of the job (renderer/settings.py: the one conversion of the config)."""
    from renderer.settings import Settings

    return Settings.from_config(cfg)


def run_job(cfg: DictConfig) -> int:
    t_start = time.time()
    try:
        plan, preset = prepare(cfg)
    except ManifestError as e:
        print(f"error: {e}\nnothing was rendered and no resources were reserved.", file=sys.stderr)
        return 2
    groups, note = planned_groups(cfg, plan)
    print(format_plan(plan, groups, note), flush=True)
    if cfg.dry_run:
        print("dry run: nothing reserved, nothing rendered.")
        return 0
    out = plan.out_dir
    save_config(cfg, out)
    from jobs.report import write_report

    job_info = {"name": plan.manifest.name, "manifest": str(Path(cfg.manifest).resolve()), "model": plan.model,
                "fingerprint": plan.fingerprint, "gpus_per_group": plan.gpus_per_group,
                "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_start)),
                "config": str(out / "config.yaml"), "gpu_hour_cost": _node(cfg, "job.gpu_hour_cost"),
                "budget_gpu_hours": _node(cfg, "job.budget_gpu_hours")}
    if not plan.todo:
        records = _records_without_render(plan)
        json_path, html_path = write_report(out, job_info, records, time.time() - t_start)
        print(f"nothing to render: all {len(plan.shots)} shots are done.")
        held = _print_held(out, records)
        print(f"report: {html_path}")
        return 1 if held else 0
    records, interrupted = _render(cfg, plan, preset, job_info)
    wall = time.time() - t_start
    json_path, html_path = write_report(out, {**job_info, "dashboard": job_info.get("dashboard")}, records, wall)
    not_started = [r.shot.id for r in records.values() if r.status == "not_started"]
    failed = [r for r in records.values() if r.status not in ("done", "skipped", "not_started")]
    done = sum(1 for r in records.values() if r.status == "done")
    gpu_s = sum(r.gpu_seconds for r in records.values())
    print(f"\njob {plan.manifest.name}: {done} rendered, {len(plan.done)} already done, {len(failed)} failed "
          f"in {format_duration(wall)}; {gpu_s:.1f} GPU-seconds" + _money(cfg, gpu_s))
    if not_started:
        print(f"  budget job.budget_gpu_hours={cfg.job.budget_gpu_hours} reached: {len(not_started)} shot(s) not "
              f"started: {', '.join(not_started)}")
    for r in failed:
        last = r.attempts[-1]["log"] if r.attempts else "-"
        print(f"  FAILED {r.shot.id}: {r.error or r.status} (attempts {len(r.attempts)}, log {last})")
    held = _print_held(out, records)
    print(f"report: {html_path}\n        {json_path}")
    if interrupted:
        return 130
    return 1 if failed or not_started or held else 0


def _print_held(out: Path, records: dict) -> list:
    """Shots the content-safety gate holds in <out>/quarantine/ (rendered, not delivered), each with its reason."""
    held = []
    for r in records.values():
        side = held_sidecar(out, r.shot.output) if not r.shot.mp4.is_file() else None
        if r.status in ("done", "skipped") and side is not None:
            held.append(r)
            print(f"  HELD {r.shot.id} in {out / 'quarantine'}: {(side.get('safety') or {}).get('reason')}; after "
                  f"review: wanrender release {out} {r.shot.output} --by NAME --reason ...")
    return held


def _money(cfg: DictConfig, gpu_s: float) -> str:
    rate = _node(cfg, "job.gpu_hour_cost")
    return "" if rate is None else f", cost {gpu_s / 3600 * rate:.2f} at {rate:g} per GPU-hour"


def _mark_unfinished(records: dict, status: str, why: str) -> dict:
    for r in records.values():
        if r.status in ("queued", "running"):
            r.status, r.error = status, why
    return records


def _records_without_render(plan: Plan):
    from jobs.scheduler import ShotRecord

    return {p.id: ShotRecord(p, "skipped") for p in plan.shots}


def _render(cfg: DictConfig, plan: Plan, preset, job_info: dict):
    import ray

    from jobs.progress import JobProgress
    from jobs.scheduler import Farm, FarmSettings, ShotRecord

    job = cfg.job
    interrupted = False
    with ray_session(cfg) as dashboard:
        job_info["dashboard"] = dashboard
        print(f"Ray dashboard: {dashboard}" if dashboard else "Ray dashboard: not running", flush=True)
        use_gpus = ray.cluster_resources().get("GPU", 0) > 0
        from jobs.prepare_stage import run_prepare_stage, settings_from, shots_needing_prepare

        planned = list(plan.shots)  # a shot whose plate fails preprocessing leaves the plan, not the report
        if shots_needing_prepare(plan):  # Animate plates become preprocessed folders before any group starts
            job_info["prepare_failures"] = run_prepare_stage(plan, settings_from(cfg), _node(cfg, "prepare.checkpoint"),
                                                             use_ray=True)
        settings = FarmSettings(
            gpus_per_group=plan.gpus_per_group, use_gpus=use_gpus, max_groups=_node(job, "max_groups"),
            max_retries=int(job.max_retries), shot_timeout_s=float(job.shot_timeout_s),
            group_start_timeout_s=float(_node(job, "group_start_timeout_s", 900)),
            node_failure_limit=int(job.node_failure_limit), worker_spec=worker_spec(cfg, preset),
            faults=parse_faults(os.environ.get(FAULTS_ENV)), budget_gpu_hours=_node(job, "budget_gpu_hours"),
            job_meta={"name": plan.manifest.name, "manifest": job_info["manifest"]})
        progress = JobProgress(len(plan.todo), len(plan.done), live=_node(job, "live_progress"))
        farm = Farm(plan, settings, progress)
        try:
            records = farm.run()
        except KeyboardInterrupt:
            interrupted = True
            records = _mark_unfinished(farm.records, "interrupted", "job interrupted (Ctrl-C)")
        except Exception as e:  # a driver bug or a lost Ray head: still end with a report, say where the trace is
            import traceback

            trace = plan.out_dir / "logs" / "driver-error.log"
            trace.write_text(traceback.format_exc(), encoding="utf-8")
            records = _mark_unfinished(farm.records, "failed", f"driver error: {type(e).__name__}: {e} "
                                                                f"(trace in logs/{trace.name})")
            print(f"error: the driver failed: {type(e).__name__}: {e}; traceback in {trace}", file=sys.stderr)
        finally:
            progress.close()
        failed_prep = job_info.get("prepare_failures") or {}
        records.update({p.id: ShotRecord(p, "failed", error=failed_prep[p.id]) for p in planned if p.id in failed_prep})
        job_info["events"] = farm.events
        job_info["blocklisted_nodes"] = sorted(farm.blocklist)
        job_info["node_failures"] = farm.node_failures
    return records, interrupted
