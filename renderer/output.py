"""A rendered shot becomes `<out>/<name>.mp4` and its sidecar `<out>/<name>.json`, both written atomically.

The sidecar holds everything needed to re-render the shot (prompt, negative prompt, seed, task, model,
checkpoint fingerprint, sampler, steps, guidance, size, frames, code version) and the per-stage timings.
`render_hash` is the hash of exactly the render-relevant settings: the farm skips a shot whose MP4 exists and
whose sidecar carries the same hash.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

from kernels.settings import KernelSettings
from renderer.pipeline import Pipeline, RenderResult, ShotSpec
from renderer.provenance import code_version

# settings that change the pixels; anything else (timings, paths, tags) does not force a re-render
RENDER_FIELDS = ("task", "prompt", "negative_prompt", "image", "size", "frames", "steps", "seed", "guidance",
                 "sampler", "shift")


def _image_digest(path: str | None) -> str | None:
    if not path:
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def render_hash(shot: ShotSpec, model_name: str, fingerprint: str, kernels: KernelSettings,
                tier: dict | None = None, label=None) -> str:
    """Hash of the resolved render-relevant settings, the model, the checkpoint (and the image's bytes) and the
    kernel settings: a fast preview (another backend, a lossy kernel, FP8, a step cache) never counts as the
    finished render. tier: TierSettings.describe() of a non-exact quality tier (exact keeps its hash).
    label: the burned-in label's style (renderer.label.LabelStyle) when the shot is labelled — it changes pixels;
    unlabelled shots keep the hash they always had."""
    d = {k: getattr(shot, k) for k in RENDER_FIELDS}
    if tier is not None and tier.get("name", "exact") != "exact":
        d["quality"] = tier
    d["seed"] = shot.hash_seed()
    if label is not None:
        d["label"] = asdict(label)
    d["guidance"] = list(d["guidance"]) if isinstance(d["guidance"], tuple) else d["guidance"]
    d["image"] = _image_digest(shot.image)
    d["model"], d["fingerprint"] = model_name, fingerprint
    d["kernels"] = kernels.to_dict()
    return hashlib.sha256(json.dumps(d, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:20]


def _tier(pipe: Pipeline) -> dict | None:
    tier = getattr(pipe, "tier", None)
    return tier.describe() if tier is not None else None


def sidecar(pipe: Pipeline, result: RenderResult, extra: dict | None = None) -> dict:
    shot = result.shot
    from kernels.attention import resolved_backend
    from kernels.fused import fused_active

    steps = result.step_seconds
    return {
        "shot_id": shot.shot_id,
        "task": shot.task,
        "prompt": shot.prompt,
        "negative_prompt": shot.negative_prompt,
        "image": shot.image,
        "seed": shot.seed,
        "seed_random": shot.random_seed,  # seed -1 was asked for; `seed` is the one drawn
        "size": shot.size,
        "frames": shot.frames,
        "fps": pipe.preset.fps,
        "steps": shot.steps,
        "sampler": shot.sampler,
        "shift": shot.shift,
        "guidance": {"low_noise": shot.guidance[0], "high_noise": shot.guidance[1]},
        "boundary": pipe.preset.boundary,
        "experts_used_per_step": result.experts_used,
        "model": pipe.preset.name,
        "checkpoint": pipe.checkpoint,
        "checkpoint_fingerprint": pipe.fingerprint,
        "render_hash": render_hash(shot, pipe.preset.name, pipe.fingerprint, pipe.kernels, _tier(pipe)),
        "quality": _tier(pipe) or {"name": "exact"},
        "final": (_tier(pipe) or {"name": "exact"})["name"] == "exact",  # fast and draft renders never are
        **pipe.cache_report(),
        "code_version": code_version(),
        "device": str(pipe.device),
        "dtype": str(pipe.dtype).replace("torch.", ""),
        "placement": pipe.placement,
        "kernels": pipe.kernels.to_dict(),
        "attention_backend": resolved_backend(pipe.kernels.attention),
        "fused_kernels": fused_active(pipe.device, pipe.kernels.fused),
        "compile_seconds": {f"expert{i}:{k}": round(v, 2) for i, m in enumerate(pipe.experts)
                            for k, v in getattr(m, "compile_seconds", {}).items()},
        "timings_s": {**{k: round(v, 4) for k, v in result.timings.items()},
                      "step_median": round(sorted(steps)[len(steps) // 2], 4) if steps else None,
                      "model_load": round(pipe.load_seconds, 4)},
        "rendered_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "shot": asdict(shot),
        **(extra or {}),
    }


def write_shot(pipe: Pipeline, result: RenderResult, out_dir: str | Path, name: str | None = None,
               label: bool = False, extra: dict | None = None, delivery=None, prompt_fields: dict | None = None,
               screen=None) -> tuple[Path, Path]:
    """Screen the frames (`screen`: renderer.safety.OutputScreen), then write the MP4 (labelled and signed as
    `delivery` says) then the sidecar, each atomically, into <out>/ — or <out>/quarantine/ when the screen holds
    the shot. The sidecar lands last: an MP4 without a sidecar, or with a sidecar from other settings, never
    counts as done."""
    from renderer.delivery import DeliverySettings, delivery_folder, write_delivered
    from renderer.media_provenance import build_record, mp4_tags
    from renderer.video_io import sidecar_path, write_json_atomic

    delivery = delivery or DeliverySettings()
    shot = result.shot
    t0 = time.perf_counter()
    safety = screen.check(result.frames) if screen is not None else None
    result.timings["safety_screen"] = time.perf_counter() - t0
    out = delivery_folder(out_dir, held=bool(safety and safety["held"]))
    out.mkdir(parents=True, exist_ok=True)
    mp4 = out / f"{name or result.shot.shot_id}.mp4"
    t0 = time.perf_counter()
    record = build_record(shot_id=shot.shot_id, preset_name=pipe.preset.name, checkpoint_fingerprint=pipe.fingerprint,
                          prompt=shot.prompt, negative_prompt=shot.negative_prompt, seed=shot.seed,
                          tier=(_tier(pipe) or {"name": delivery.tier}).get("name", delivery.tier),
                          code_version=code_version(), prompt_fields=prompt_fields,
                          label=delivery.label.text if label else None)
    meta = {"comment": shot.prompt, "title": shot.shot_id, **mp4_tags(record),
            "description": f"AI-generated with wanrender {code_version()} ({pipe.preset.name})"}
    signed = write_delivered(result.frames, mp4, pipe.preset.fps, meta, record, delivery, labelled=label)
    result.timings["mp4_write"] = time.perf_counter() - t0
    from renderer.safety import prompt_screen_record

    provenance = {"prompt_fields": prompt_fields, "provenance": record, "c2pa_signed": signed, "safety": safety,
                  "prompt_screen": prompt_screen_record(shot.prompt, delivery.safety),
                  "render_hash": render_hash(shot, pipe.preset.name, pipe.fingerprint, pipe.kernels, _tier(pipe),
                                             delivery.label if label else None)}
    side = write_json_atomic(sidecar_path(mp4), sidecar(pipe, result, {**(extra or {}), **provenance}))
    return mp4, side
