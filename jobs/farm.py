"""`wanrender render manifest=FILE`: the render farm's driver.

    Hydra config + manifest --validate--> plan (what is done, priority order, estimate)   [no Ray, no GPU]
        --dry_run=true--> print the plan, stop
        --> Ray (embedded local cluster, or cluster=ray cluster.address=HOST:PORT)
        --> render groups (jobs/group.py) pulling from the priority queue (jobs/scheduler.py)
        --> <out>/<shot>.mp4 + sidecar, <out>/logs/, <out>/config.yaml, <out>/report.{json,html}

Exit status: 0 when every shot is rendered (or was already), 1 when any shot failed for good, 2 for bad input
or a folder another job holds (nothing reserved), 3 when the machine stopped the job (disk full, read-only
folder, missing binary: the report says which), 130 when interrupted.

Faults (issue 15): one job per output folder (jobs/lock.py); temp files swept at the start (under the lock); every
failure classified (jobs/faults.py); a report is always written, or a message says why it could not be.
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


def command_line(cfg: DictConfig) -> list[str]:
    """The overrides given on the command line (renderer.conf.compose keeps them), for precedence."""
    return [str(o) for o in (_node(cfg, "command_line") or [])]


def choose_preset(cfg: DictConfig, manifest_model: Any) -> tuple[Any, list[str]]:
    """The model for the job: command line > the manifest's `model:` > the config's default. A manifest model
    takes the command line's model.* overrides (model.checkpoint=...), and the config is recomposed with it, so
    the saved config.yaml and the render groups see the model the plan used. Returns (preset, notes)."""
    from renderer.presets import load_preset

    overrides = command_line(cfg)
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
    cli_model = next((o.split("=", 1)[1] for o, k in zip(overrides, keys) if k == "model"), None)
    notes = []
    if manifest_model and str(manifest_model) != _node(cfg, "model.name"):
        if cli_model is not None:
            notes.append(f"command line model={cli_model} overrides the manifest: model {manifest_model}")
        else:
            from omegaconf import open_dict

            from renderer.conf import compose

            load_preset(str(manifest_model))  # an unknown name raises here, with the choices
            recomposed = compose([f"model={manifest_model}", *overrides])
            with open_dict(cfg):
                cfg.model = recomposed.model
    return load_preset(cfg.model), notes


def prepare(cfg: DictConfig) -> tuple[Plan, Any]:
    """Config + manifest -> plan. Raises ManifestError listing every problem; reserves nothing."""
    problems: list[Problem] = []
    path = _node(cfg, "manifest")
    if not path:
        raise ManifestError([Problem("manifest", "manifest", "no manifest given: wanrender render "
                                                             "manifest=examples/previs.yaml")], "config")
    raw = read_manifest(path)
    try:
        preset, notes = choose_preset(cfg, raw.get("model") if isinstance(raw, dict) else None)
    except (ValueError, TypeError, KeyError) as e:
        raise ManifestError([Problem("manifest", "model", str(e))], str(path))
    if preset.checkpoint is None and not preset.is_tiny and not _node(cfg, "render.random_weights", False):
        problems.append(Problem("manifest", "model.checkpoint", f"model {preset.name} needs its weights: "
                                                                f"model.checkpoint=/path/to/Wan2.2 folder"))
    if preset.checkpoint:  # layout, key names and shapes from headers only: seconds, before any group starts
        from renderer.preflight import check_checkpoint

        problems += [Problem("manifest", "model.checkpoint", m) for m in check_checkpoint(preset, preset.checkpoint)]
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
    if _node(cfg, "cluster.kind") != "local" and cluster_address(cfg)[0] is None:
        problems.append(Problem("manifest", "cluster.address", "cluster=ray needs the cluster's address: "
                                                               "cluster.address=HOST:6379, or set RAY_ADDRESS"))
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
            try:
                _tier_loras(cfg, q, preset)
            except TierError as e:  # name the shots that need them
                ids = [s.request.id for s in plan.shots if s.tier == q]
                shots = f"shot{'s' if len(ids) > 1 else ''} {', '.join(ids)}"
                raise TierError(f"{shots}: quality.lora_dir: {e}") from None
    except TierError as e:
        raise ManifestError([Problem("manifest", "quality" if "quality" in str(e) else "job.tiers", str(e))],
                            str(path)) from None
    from renderer.preflight import check_output

    room = [Problem("manifest", "out", m) for m in check_output(out, plan_bytes(plan), create=False)]
    if room:
        raise ManifestError(room, str(path))
    for line in notes + manifest.overrides:
        print(line, flush=True)
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


def plan_bytes(plan: Plan) -> int:
    """What the shots still to render will write (renderer.preflight's estimate)."""
    from renderer.preflight import estimate_output_bytes
    from renderer.presets import parse_size

    return estimate_output_bytes([(*parse_size(s.spec.size), s.spec.frames) for s in plan.todo])


def tier_overrides(cfg: DictConfig) -> dict[str, dict]:
    """{tier name: fields}: the quality.* settings given for the tier `quality=` names (conf/quality/)."""
    node = _node(cfg, "quality")
    if node is None:
        return {}
    d = OmegaConf.to_container(node, resolve=True)
    return {d.get("name", "exact"): {k: v for k, v in d.items() if k != "name"}}


def _tier_loras(cfg: DictConfig, name: str, preset):
    from renderer.tiers import load_tier

    tier = load_tier(name, tier_overrides(cfg).get(name)).for_family(preset.family)
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
        address, source = cluster_address(cfg)
        return None, f"Ray cluster at {address} (from {source})"
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


class ClusterUnavailable(RuntimeError):
    """Ray could not be started or reached; the message names the address and where it came from."""


def cluster_address(cfg: DictConfig) -> tuple[str | None, str]:
    """cluster=ray: (address, where it came from): cluster.address, else RAY_ADDRESS."""
    given = _node(cfg, "cluster.address")
    if given:
        return str(given), "cluster.address"
    env = os.environ.get("RAY_ADDRESS")
    return (env, "RAY_ADDRESS") if env else (None, "")


@contextmanager
def ray_session(cfg: DictConfig):
    """Reuse a Ray already initialised in this process (tests, the service), else start or connect one and stop
    it afterwards. cluster=local always starts its own instance (address="local"): Ray would otherwise join any
    cluster found through RAY_ADDRESS or /tmp/ray — someone else's. cluster=ray connects where it is told."""
    import ray

    if ray.is_initialized():
        print("Ray: using the Ray instance this process already runs", flush=True)
        yield _with_scheme(_dashboard_url())
        return
    cluster = cfg.cluster
    common = dict(log_to_driver=False, logging_level=logging.WARNING, configure_logging=True)
    if cluster.kind == "local":
        # address="local": always a fresh cluster of our own, never one someone else started on this machine
        try:
            ctx = ray.init(address="local", num_cpus=cluster.num_cpus, num_gpus=cluster.num_gpus,
                           include_dashboard=bool(cluster.dashboard), **common)
        except Exception as e:  # e.g. "Cannot include dashboard with missing packages" (seen with a minimal Ray)
            raise ClusterUnavailable(f"cannot start an embedded Ray instance: {type(e).__name__}: "
                                     f"{str(e).strip()[:300]}"
                                     + ("; or run without the dashboard: cluster.dashboard=false"
                                        if "dashboard" in str(e) else "")) from e
        res = ray.cluster_resources()
        print(f"Ray: started an embedded instance for this job ({int(res.get('CPU', 0))} CPUs, "
              f"{int(res.get('GPU', 0))} GPUs); it stops with the job", flush=True)
    else:
        address, source = cluster_address(cfg)
        print(f"Ray: connecting to the cluster at {address} (from {source})", flush=True)
        try:
            ctx = ray.init(address=address, **common)
        except Exception as e:  # ConnectionError, a timeout, a version mismatch: Ray's own text, our fix
            raise ClusterUnavailable(f"cannot connect to the Ray cluster at {address} (from {source}): "
                                     f"{type(e).__name__}: {str(e).strip()[:300]}; check that its head is running "
                                     f"and the address is right") from e
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
    from jobs.group import folded_layout_line

    folded = folded_layout_line(gpus_per_group(cfg)[1], plan.todo, preset)
    if folded:
        print(folded, flush=True)
    if cfg.dry_run:
        print("dry run: nothing reserved, nothing rendered.")
        return 0
    from jobs.lock import FolderLock, FolderLocked
    from renderer.preflight import check_output

    out = plan.out_dir
    problems = check_output(out, plan_bytes(plan), create=True)
    if problems:
        print(f"error: {problems[0]}\nnothing was rendered and no resources were reserved.", file=sys.stderr)
        return 2
    lock = FolderLock(out, job=plan.manifest.name, wait_s=float(_node(cfg, "job.lock_wait_s", 0) or 0))
    try:
        lock.acquire()
    except FolderLocked as e:
        print(f"error: {e}\nnothing was rendered and no resources were reserved.", file=sys.stderr)
        return 2
    try:
        if lock.waited:  # the other job may have rendered some of these shots meanwhile
            plan = build_plan(plan.manifest, preset, out, gpus_per_group=plan.gpus_per_group,
                              force=bool(cfg.job.force), kernels=job_settings(cfg).kernels,
                              tiers=OmegaConf.to_container(cfg.job.tiers, resolve=True)
                              if _node(cfg, "job.tiers") is not None else None, tier_overrides=tier_overrides(cfg))
        return _run_locked(cfg, plan, preset, t_start)
    finally:
        lock.release()


def _run_locked(cfg: DictConfig, plan: Plan, preset, t_start: float) -> int:
    from jobs.faults import FIXES, sweep_temp_files

    out = plan.out_dir
    removed = sweep_temp_files(out)  # left by a killed job; nobody else writes here while we hold the lock
    if removed:
        print(f"removed {len(removed)} temporary file(s) an interrupted job left in {out}")
    save_config(cfg, out)
    job_info = {"name": plan.manifest.name, "manifest": str(Path(cfg.manifest).resolve()), "model": plan.model,
                "fingerprint": plan.fingerprint, "gpus_per_group": plan.gpus_per_group,
                "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_start)),
                "config": str(out / "config.yaml"), "overrides": list(plan.manifest.overrides),
                "gpu_hour_cost": _node(cfg, "job.gpu_hour_cost"), "budget_gpu_hours": _node(cfg, "job.budget_gpu_hours")}
    if not plan.todo:
        records = _records_without_render(plan)
        paths = write_report_or_say_why(out, job_info, records, time.time() - t_start)
        print(f"nothing to render: all {len(plan.shots)} shots are done." + (f"\nreport: {paths[1]}" if paths else ""))
        held = _print_held(out, records)
        return 1 if held else 0
    try:
        records, interrupted, stopped = _render(cfg, plan, preset, job_info)
    except ClusterUnavailable as e:  # nothing started: every shot is still to do, the report says why
        records, interrupted, stopped = _records_without_render(plan, "failed"), False, str(e)
        for r in records.values():
            if r.status == "failed":
                r.error, r.failure_class = f"not started: {e}", "environment"
    wall = time.time() - t_start
    job_info["stopped"] = stopped
    paths = write_report_or_say_why(out, job_info, records, wall)
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
        print(f"  FAILED {r.shot.id} ({r.failure_class or r.status}): {r.error or r.status} "
              f"(attempts {len(r.attempts)}, log {last})")
    held = _print_held(out, records)
    if paths:
        print(f"report: {paths[1]}\n        {paths[0]}")
    if interrupted:
        return 130
    if stopped:
        print(f"error: the job stopped: {stopped}", file=sys.stderr)
        return 3
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


def write_report_or_say_why(out: Path, job_info: dict, records: dict, wall: float) -> tuple[Path, Path] | None:
    """The report, always: in the output folder, else (disk full, read-only) report.json in the temp folder,
    else a message saying why there is none. Never raises: the report must not hide the job's own outcome."""
    import tempfile

    from jobs.report import write_report

    try:
        return write_report(out, job_info, records, wall)
    except Exception as e:  # OSError (ENOSPC, EROFS) or a thumbnail decoder failure
        first = f"{type(e).__name__}: {e}"
    fallback = Path(tempfile.gettempdir()) / f"wanrender-report-{job_info.get('name', 'job')}-{os.getpid()}"
    try:
        json_path, html_path = write_report(fallback, {**job_info, "report_error": first}, records, wall,
                                            media_dir=out)
        print(f"error: the report could not be written to {out} ({first}); it is in {fallback} instead",
              file=sys.stderr)
        return json_path, html_path
    except Exception as e:
        print(f"error: no report: writing it to {out} failed ({first}) and to {fallback} too "
              f"({type(e).__name__}: {e}); the shot logs are in {out / 'logs'}", file=sys.stderr)
        return None


def _mark_unfinished(records: dict, status: str, why: str) -> dict:
    """After Ctrl-C or a driver error: a running shot whose outputs are complete on disk is done (it finished
    before the interrupt reached the driver); the others get `status`."""
    from jobs.faults import finished_on_disk

    for r in records.values():
        if r.status == "running" and finished_on_disk(r.shot):
            r.status, r.error = "done", None
            if r.attempts:
                r.attempts[-1].update(status="done", ended_at=r.attempts[-1].get("ended_at") or time.time())
        elif r.status in ("queued", "running"):
            r.status, r.error = status, why
    return records


def _records_without_render(plan: Plan, todo_status: str = "skipped"):
    from jobs.scheduler import ShotRecord

    return {p.id: ShotRecord(p, "skipped" if p.done else todo_status) for p in plan.shots}


def _render(cfg: DictConfig, plan: Plan, preset, job_info: dict):
    import ray

    from jobs.progress import JobProgress
    from jobs.scheduler import Farm, FarmSettings, ShotRecord

    from jobs.faults import sweep_temp_files
    from jobs.report import write_report

    job = cfg.job
    interrupted = False
    with ray_session(cfg) as dashboard:
        job_info["dashboard"] = dashboard
        print(f"Ray dashboard: {dashboard}" if dashboard else "Ray dashboard: not running", flush=True)
        try:  # a report while the job runs: the queue and the dashboard link (the final one has no link)
            write_report(plan.out_dir, {**job_info, "running": True}, _records_without_render(plan, "queued"), 0.0,
                         thumbs=False)
        except Exception as e:  # noqa: BLE001 - the final report says what matters; this one is a courtesy
            log.warning("report at the start of the job not written: %s", e)
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
            max_preemptions=int(_node(job, "max_preemptions", 5)),
            faults=parse_faults(os.environ.get(FAULTS_ENV)), budget_gpu_hours=_node(job, "budget_gpu_hours"),
            job_meta={"name": plan.manifest.name, "manifest": job_info["manifest"]})
        progress = JobProgress(len(plan.todo), len(plan.done), live=_node(job, "live_progress"))
        farm = Farm(plan, settings, progress)
        try:
            records = farm.run()
        except KeyboardInterrupt:
            interrupted = True
            records = _mark_unfinished(farm.records, "interrupted", "job interrupted (Ctrl-C)")
            sweep_temp_files(plan.out_dir)  # the groups are killed: what a rank was writing is partial
        except Exception as e:  # a driver bug or a lost Ray head: still end with a report, say where the trace is
            import traceback

            trace = plan.out_dir / "logs" / "driver-error.log"
            try:
                trace.write_text(traceback.format_exc(), encoding="utf-8")
            except OSError:  # the folder itself may be what failed (disk full): the trace goes to stderr
                traceback.print_exc()
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
    return records, interrupted, farm.stopped
