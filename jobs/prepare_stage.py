"""The farm's preprocessing stage: every Animate/replace shot whose `video` is a raw plate is preprocessed
(renderer.prepare) before any render group starts, on Ray CPU tasks (GPU tasks with prepare.device=cuda), into
<out>/prep/<content hash>/ — a resubmitted job finds its folders there and skips the work. The shot's `video` then
points at its folder, which is what the Animate renderer reads. A shot whose preprocessing fails is reported and
left out; the other shots go on.
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

log = logging.getLogger("wanrender.farm")


def settings_from(cfg):
    from omegaconf import OmegaConf

    from renderer.prepare import PrepareSettings

    p = OmegaConf.to_container(cfg.prepare, resolve=True) if "prepare" in cfg else {}
    device = p.get("device", "cpu")
    return PrepareSettings.from_config({**p, "device": "cpu" if device == "auto" else device})


def _prepare_one(video: str, image: str, task: str, cache_root: str, settings, checkpoint) -> str:
    from renderer.prepare.shots import prepared_folder

    return str(prepared_folder(video, image, task, cache_root, settings, checkpoint))


def shots_needing_prepare(plan) -> list:
    return [p for p in plan.todo
            if getattr(p.request, "clip_plan", None) is not None and p.request.video
            and not Path(p.request.video).is_dir()]


def run_prepare_stage(plan, settings, checkpoint, use_ray: bool) -> dict[str, str]:
    """Preprocess what the plan needs; point each shot's request at its folder. Returns {shot id: error} of the
    shots that could not be preprocessed (they are removed from the plan)."""
    shots = shots_needing_prepare(plan)
    if not shots:
        return {}
    cache_root = str(plan.out_dir / "prep")
    t0 = time.time()
    print(f"preprocessing {len(shots)} Animate shot(s) into {cache_root} ...", flush=True)
    results: dict[str, str | Exception] = {}
    if use_ray:
        import ray

        gpu = settings.device.startswith("cuda")
        task = ray.remote(num_cpus=1, num_gpus=1 if gpu else 0, max_retries=1)(_prepare_one)
        refs = {p.id: task.remote(p.request.video, p.request.spec.image, p.request.spec.task, cache_root,
                                  settings, checkpoint) for p in shots}
        for sid, ref in refs.items():
            try:
                results[sid] = ray.get(ref)
            except Exception as e:  # RayTaskError wraps the worker's PrepareError / crash
                results[sid] = e
    else:
        for p in shots:
            try:
                results[p.id] = _prepare_one(p.request.video, p.request.spec.image, p.request.spec.task, cache_root,
                                             settings, checkpoint)
            except Exception as e:  # one shot's bad plate must not stop the others
                results[p.id] = e
    failures = {}
    for p in shots:
        r = results[p.id]
        if isinstance(r, Exception):
            failures[p.id] = f"preprocessing failed: {str(r).strip().splitlines()[-1][:300]}"
            print(f"  FAILED {p.id}: {failures[p.id]}", flush=True)
        else:
            p.request = replace(p.request, video=r)
            print(f"  {p.id}: {r}", flush=True)
    plan.shots = [p for p in plan.shots if p.id not in failures]
    print(f"preprocessing done in {time.time() - t0:.1f}s ({len(failures)} failed)", flush=True)
    return failures


def check_prepare_config(cfg, shots) -> list[tuple[str, str]]:
    """(field, problem) of the preprocessing config for the shots that need it — checked with the manifest, before
    Ray starts: the settings, and that every checkpoint file the shots' tasks need is there."""
    from renderer.prepare.checkpoints import CheckpointPaths
    from renderer.prepare.errors import PrepareError

    need = [s for s in shots if getattr(s, "clip_plan", None) is not None and s.video and not Path(s.video).is_dir()]
    if not need:
        return []
    try:
        settings_from(cfg)
        paths = CheckpointPaths.under(cfg.prepare.get("checkpoint"), any(s.spec.task == "replace" for s in need))
    except PrepareError as e:
        return [("prepare", str(e))]
    return [("prepare.checkpoint", f"{p} not found: the plates of {len(need)} Animate shot(s) need it "
                                   "(the official process_checkpoint/ folder)")
            for p in (paths.detector, paths.pose, paths.sam2) if p is not None and not p.is_file()]
