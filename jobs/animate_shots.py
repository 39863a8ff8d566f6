"""Animate / replace shots on the farm: their plan entries, their render hash, and how a render group renders them.

    manifest shot (task animate | replace, video = plate or prepared folder, image, mask, refert_num, loras)
      --plan-->   frames / size from the plate at the render fps, a render hash over the plate, image, mask,
                  mode, refert_num, LoRAs and the preprocessing settings
      --prepare stage (jobs/prepare_stage.py)--> the shot's `video` is its prepared folder
      --render group--> renderer.prepare.folder.load_prepared -> the Animate family's own clip loop
                  (renderer.families.animate.generate: load_stack / render_video) -> frames conformed to the plate's
                  frame count with its audio (write_shot_from_plate) under a temporary name, read back, renamed
                  -> sidecar (plate hash, preprocessing models and settings, mode, refert_num, LoRAs), written last

A rank keeps one loaded model stack; a shot with other LoRAs than the loaded ones rebuilds the DiT once (LoRAs are
applied before the model is parallelised, as FSDP shards whatever weights it is given).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

log = logging.getLogger("wanrender.animate_shots")


def is_animate(request) -> bool:
    """A manifest shot rendered by the Animate family's clip loop (the manifest gave it a clip plan)."""
    return getattr(request, "clip_plan", None) is not None


def shot_loras(spec, checkpoint: str | None) -> list[tuple[str, float]]:
    """The manifest's `loras` ([path, "path:scale", "relighting", {path, scale}]) as [(path, scale)]."""
    from renderer.families.animate.generate import parse_loras

    out = []
    for item in list(spec or []):
        if isinstance(item, dict):
            if "path" not in item:
                raise ValueError(f"loras: {item!r} has no `path`")
            out += parse_loras([item["path"]], checkpoint)[:1]
            out[-1] = (out[-1][0], float(item.get("scale", 1.0)))
        else:
            out += parse_loras([item], checkpoint)
    return out


def lora_problems(loras, checkpoint: str | None, base_dir: Path) -> tuple[list | None, list[tuple[str, str]]]:
    """(resolved [(path, scale)], problems) of a shot's `loras`, paths relative to the manifest's folder."""
    try:
        parsed = shot_loras(loras, checkpoint)
    except (ValueError, TypeError) as e:
        why = str(e).removeprefix("loras: ")
        return None, [("loras", f"{why}; each LoRA is a file path, \"path:scale\", {{path, scale}} or relighting")]
    resolved = [(str(p if Path(p).is_absolute() else (base_dir / p).resolve()), s) for p, s in parsed]
    problems = [("loras", f"LoRA file {p} does not exist: check the path") for p, _ in resolved
                if not Path(p).is_file()]
    return resolved, problems


def folder_problems(video: str | None) -> list[tuple[str, str]]:
    """A prepared folder given as `video` must still have its plate: the output takes the plate's length and
    audio (renderer.prepare.folder.write_shot_from_plate)."""
    if not video or not Path(video).is_dir() or not (Path(video) / "meta.json").is_file():
        return []
    try:
        plate = json.loads((Path(video) / "meta.json").read_text())["plate"]["path"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [("video", f"{video}/meta.json does not name its plate ({e}): prepare it again")]
    if not Path(plate).is_file():
        return [("video", f"the plate {plate} that {video} was prepared from is gone: the output takes its length "
                          "and audio; restore it or prepare again")]
    return []


def _digest(path: str | None) -> str | None:
    """Content digest of a plate / mask / LoRA file, or a prepared folder's cache key (its inputs' hash)."""
    if not path:
        return None
    p = Path(path)
    if p.is_dir():
        return json.loads((p / "meta.json").read_text())["cache_key"]
    st = p.stat()
    return _file_digest(str(p.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """SHA-256 of a file, once per (path, size, mtime) in this process: many shots share one plate or LoRA."""
    from renderer.prepare.footage import file_sha256

    return file_sha256(path)


def output_size(request, area) -> tuple[int, int]:
    """(width, height) the shot renders at: the prepared folder's, or what `prepare` will choose at `area`
    (replace: the plate's shape; animate: the character's)."""
    from renderer.prepare.footage import probe_plate, read_image_rgb, size_by_area

    video = Path(request.video)
    if video.is_dir():
        meta = json.loads((video / "meta.json").read_text())
        return int(meta["width"]), int(meta["height"])
    if request.spec.task == "replace":
        info = probe_plate(video)
        w, h = info.width, info.height
    else:
        h, w = read_image_rgb(request.spec.image).shape[:2]
    return size_by_area(w, h, area[0] * area[1])


def plan_entry(spec, request, base_hash: str, prepare_fields: dict | None) -> tuple[Any, str]:
    """(spec with the frames and size the output will have, render hash) of an Animate shot. The hash extends
    the ordinary one (prompt, seed, steps, model, kernels, image, ...) with what only Animate shots have."""
    fields = prepare_fields or {}
    w, h = output_size(request, fields.get("area") or (1280, 720))
    spec = replace(spec, frames=int(request.clip_plan.frames), size=f"{w}*{h}")
    video = request.video
    d = {"base": base_hash, "video": _digest(video), "mask": _digest(request.mask),
         "refert_num": request.refert_num or 1, "size": spec.size, "frames": spec.frames,
         "loras": [[_digest(p), s] for p, s in (request.loras or [])],
         # a raw plate's preprocessing settings change the inputs; a prepared folder's key already holds them
         "prepare": None if Path(video).is_dir() else {k: v for k, v in fields.items() if k != "mode"}}
    return spec, hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:20]


def task_fields(shot) -> dict:
    """What a render group needs beyond the ordinary shot task (jobs/scheduler.py adds it to the task)."""
    req = shot.request
    if not is_animate(req):
        return {}
    return {"animate": {"mode": _mode(req.spec.task), "refert_num": req.refert_num, "loras": req.loras or [],
                        "mask": req.mask, "render_hash": shot.render_hash, "frames": shot.spec.frames,
                        "size": shot.spec.size}}


def _mode(task: str) -> str:
    from renderer.families.animate import mode_of_task

    return mode_of_task(task)


# -- on a render group's rank ------------------------------------------------------------------------------------
def user_mask(path: str, frames: int, height: int, width: int):
    """A manifest `mask` (a mask video with the plate's frame count at the render fps, or a still image for every
    frame; white = character) as [frames, H, W] in {0, 1}."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from renderer.prepare.footage import read_image_rgb
    from renderer.video_io import read_video

    p = Path(path)
    m = read_image_rgb(p)[None] if p.suffix.lower() in (".png", ".jpg", ".jpeg") else read_video(p)  # [n,h,w,3]
    m = torch.from_numpy(np.ascontiguousarray(m[..., 0] > 127)).float()  # [n, h, w]
    idx = torch.linspace(0, len(m) - 1, frames).round().long() if len(m) > 1 else torch.zeros(frames).long()
    return F.interpolate(m[idx][:, None], size=(height, width), mode="nearest")[:, 0]  # [frames, H, W]


class AnimateShots:
    """The Animate side of a render group's rank: one loaded stack, shot after shot."""

    def __init__(self, preset, options, group=None, quality_overrides: dict | None = None):
        from renderer.families.animate.generate import load_stack

        self.preset, self.options, self.group = preset, options, group
        self.quality_overrides = quality_overrides or {}  # {tier name: conf/quality fields} from the job's quality.*
        self.stack = load_stack(preset, options, group)

    def tier(self, name: str):
        """The quality tier `name` as an Animate shot renders it (a draft: the Wan2.1-I2V 4-step LoRA)."""
        from renderer.tiers import load_tier

        return load_tier(name, self.quality_overrides.get(name)).for_family("animate")

    def _use_loras(self, loras: list[tuple[str, float]], mode: str = "unmerged", tier_loras=(),
                   tier_mode: str = "merged") -> None:
        """The DiT with these LoRAs (the shot's, in `mode`; the tier's, merged): rebuilt only when they differ from
        the loaded ones (a draft's merged LoRA cannot be taken out of the weights)."""
        tier_loras = tuple(map(tuple, tier_loras))
        if (tuple(map(tuple, loras)) == tuple(self.stack.loras) and mode == self.stack.lora_mode
                and tier_loras == tuple(self.stack.tier_loras)
                and (not tier_loras or tier_mode == self.stack.tier_mode)):
            return
        import gc

        import torch

        from renderer.families.animate.generate import load_stack

        log.info("reloading the model for LoRAs %s (%s)", loras or "none", mode)
        self.stack = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.stack = load_stack(self.preset, self.options, self.group, [tuple(x) for x in loras], mode,
                                tier_loras=tier_loras, tier_lora_mode=tier_mode)

    def inputs(self, folder: str, a: dict):
        """The shot's AnimateInputs from its prepared folder (and the manifest's mask, when given)."""
        from renderer.families.animate.conditioning import AnimateInputs
        from renderer.prepare.folder import load_prepared

        d = load_prepared(folder, a["mode"])
        inp = AnimateInputs(d["mode"], d["reference"], d["pose"], d["face"], d["background"], d["mask"])
        if a.get("mask") and inp.mode == "replace":
            _, f, h, w = inp.pose.shape
            inp.mask = user_mask(a["mask"], f, h, w)
        if inp.face.shape[-1] != self.preset.dit.motion_size:  # the tiny models take smaller face crops
            import torch.nn.functional as F

            s = self.preset.dit.motion_size
            face = inp.face.transpose(0, 1)  # [F, 3, 512, 512]
            inp.face = F.interpolate(face, size=(s, s), mode="bilinear", antialias=True).transpose(0, 1)
        return inp

    def render(self, task: dict, on_step, world_size: int, t0: float, delivery=None, screen=None) -> dict:
        """Render the shot (every rank), write MP4 + sidecar (rank 0). Returns the rank's result for the driver.
        delivery / screen: the job's renderer.delivery.DeliverySettings and renderer.safety.OutputScreen, applied
        as to every other shot (safety hold into quarantine/, provenance tags, label, C2PA signing)."""
        from renderer.families.animate.conditioning import check_inputs
        from renderer.families.animate.generate import animate_settings, render_video
        from renderer.pipeline import ShotError

        shot, a = task["shot"], task["animate"]
        if not task.get("video") or not (Path(task["video"]) / "meta.json").is_file():
            raise ShotError(f"shot {shot.shot_id}: video: {task.get('video')} is not a prepared folder (the "
                            "prepare stage did not run for it)")
        tier = self.tier(task.get("quality") or "exact")
        files = tier.loras_per_expert(1, random_weights=self.preset.checkpoint is None)[0]
        self._use_loras(a["loras"], tier_loras=[(str(p), s) for p, s in files], tier_mode=tier.lora_mode)
        settings = animate_settings(self.preset, refert_num=a["refert_num"], steps=shot.steps, shift=shot.shift,
                                    sampler=shot.sampler, guidance=shot.guidance)
        inp = self.inputs(task["video"], a)
        problems = check_inputs(inp, settings, face_size=self.preset.dit.motion_size)
        if problems:
            raise ShotError("; ".join(f"shot {shot.shot_id}: {f}: {m}" for f, m in problems))
        video, timings, clips = render_video(self.stack, inp, shot.prompt, shot.negative_prompt, settings,
                                             shot.seed, name=shot.shot_id, progress=False, on_step=on_step)
        out: dict[str, Any] = {}
        if self.stack.is_main:
            mp4, side = self.write(task, video, timings, clips, settings, world_size, t0, delivery, screen, tier)
            out.update(mp4=str(mp4), sidecar=str(side), held=mp4.parent.name == "quarantine")
        out.update(seconds=round(time.perf_counter() - t0, 3), timings={k: round(v, 4) for k, v in timings.items()})
        return out

    def write(self, task: dict, video, timings: dict, clips: int, settings, world_size: int, t0: float,
              delivery=None, screen=None, tier=None):
        """The MP4 at the plate's length with its audio: temporary name, read back, renamed; the sidecar last."""
        import numpy as np

        from renderer.delivery import DeliverySettings, delivery_folder
        from renderer.label import make_stamper
        from renderer.media_provenance import build_record, mp4_tags, sign_mp4
        from renderer.output import code_version
        from renderer.prepare.audio import audio_duration, has_audio
        from renderer.prepare.folder import provenance, write_shot_from_plate
        from renderer.safety import prompt_screen_record
        from renderer.video_io import _tmp_sibling, sidecar_path, to_uint8_frames, video_info, write_json_atomic

        shot, a, folder = task["shot"], task["animate"], task["video"]
        delivery = delivery or DeliverySettings()
        frames = to_uint8_frames(video[None])  # [F, H, W, 3] uint8
        t = time.perf_counter()
        safety = screen.check(frames) if screen is not None else None
        timings["safety_screen"] = time.perf_counter() - t
        labelled = bool(task.get("label") or delivery.label_all)
        if labelled:  # the burned-in label, as write_delivered draws it on every other shot
            stamp = make_stamper(delivery.label, frames.shape[1], frames.shape[2])
            frames = np.stack([stamp(f) for f in frames])  # [F, H, W, 3]
        out_dir = delivery_folder(task["out_dir"], held=bool(safety and safety["held"]))
        out_dir.mkdir(parents=True, exist_ok=True)
        mp4 = out_dir / f"{task['output']}.mp4"
        record = build_record(shot_id=shot.shot_id, preset_name=self.preset.name,
                              checkpoint_fingerprint=_fingerprint(self.preset), prompt=shot.prompt,
                              negative_prompt=shot.negative_prompt, seed=shot.seed,
                              tier=tier.name if tier is not None else "exact",
                              code_version=code_version(), prompt_fields=task.get("prompt_fields"),
                              label=delivery.label.text if labelled else None)
        meta = {"comment": shot.prompt, "title": shot.shot_id, **mp4_tags(record),
                "description": f"AI-generated with wanrender {code_version()} ({self.preset.name}, {a['mode']})"}
        tmp, signed = _tmp_sibling(mp4, ".mp4"), _tmp_sibling(mp4, ".mp4")
        t = time.perf_counter()
        try:
            write_shot_from_plate(frames, folder, tmp, metadata=meta)
            if delivery.signing.enabled:  # signed last: the manifest covers the picture and the plate's audio
                sign_mp4(tmp, signed, record, delivery.signing)
                os.replace(signed, tmp)
            info = video_info(tmp)  # read back: a short or unreadable file never takes the final name
            if info["frames"] != a["frames"]:
                raise RuntimeError(f"{tmp} holds {info['frames']} frames, the plate gives {a['frames']}")
            os.replace(tmp, mp4)
        except BaseException:
            tmp.unlink(missing_ok=True)
            signed.unlink(missing_ok=True)
            raise
        timings["mp4_write"] = time.perf_counter() - t
        prep = provenance(folder)
        job = dict(task["job"])
        job["gpu_seconds"] = round(job.get("earlier_attempts_gpu_seconds", 0.0)
                                   + job.get("gpus", world_size) * (time.perf_counter() - t0), 3)
        st = self.stack
        side = {
            "shot_id": shot.shot_id, "task": shot.task, "family": "animate", "mode": a["mode"],
            "prompt": shot.prompt, "negative_prompt": shot.negative_prompt, "image": shot.image,
            "seed": shot.seed, "seed_random": shot.random_seed, "size": f"{info['width']}*{info['height']}",
            "frames": info["frames"], "fps": self.preset.fps, "duration_s": round(info["frames"] / self.preset.fps, 6),
            "audio": {"from_plate": prep["plate"]["path"], "present": has_audio(mp4),
                      "duration_s": audio_duration(mp4)},
            "steps": settings.steps, "sampler": settings.sampler, "shift": settings.shift,
            "guidance": {"low_noise": settings.guidance, "high_noise": settings.guidance},
            "clip_len": settings.clip_len, "refert_num": settings.refert_num, "clips": clips,
            "clip_preprocess": settings.clip_preprocess,
            "loras": [{"path": p, "scale": s, "mode": st.lora_mode} for p, s in st.loras],
            "mask": a.get("mask"), "plate_sha256": prep["plate"]["sha256"], "preprocessing": prep,
            "model": self.preset.name, "checkpoint": self.preset.checkpoint,
            "checkpoint_fingerprint": _fingerprint(self.preset), "render_hash": a["render_hash"],
            "quality": tier.describe() if tier is not None else {"name": "exact"},
            "final": tier is None or tier.is_final, "kernels": self.options.kernels.to_dict(),
            "code_version": code_version(), "device": str(st.device), "dtype": str(st.dtype).replace("torch.", ""),
            "timings_s": {**{k: round(v, 4) for k, v in timings.items()}, "model_load": round(st.load_seconds, 4)},
            "rendered_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "job": job,
            "prompt_fields": task.get("prompt_fields"), "provenance": record, "c2pa_signed": delivery.signing.enabled,
            "safety": safety, "prompt_screen": prompt_screen_record(shot.prompt, delivery.safety), "label": labelled,
        }
        return mp4, write_json_atomic(sidecar_path(mp4), side)


def _fingerprint(preset) -> str:
    """The model's identity as the plan names it (jobs.plan.model_fingerprint, which imports this module)."""
    if preset.checkpoint:
        from renderer.checkpoint import fingerprint

        return fingerprint(preset.checkpoint)
    return f"random-seed{preset.seed_weights}"


def contact_images(video: str | None, mp4: Path | None = None) -> dict[str, str | None]:
    """The contact sheet's inputs of an Animate shot: the plate and the preprocessing preview. `video` is the
    prepared folder (after the prepare stage) or the raw plate (a shot already done: its sidecar names the folder)."""
    none = {"plate": None, "preview": None}
    if not video:
        return none
    folder = Path(video)
    if not folder.is_dir():
        from renderer.video_io import read_json, sidecar_path

        try:
            folder = Path(read_json(sidecar_path(mp4))["preprocessing"]["folder"])
        except (OSError, ValueError, KeyError, TypeError):  # not rendered yet (or not by the farm): the plate only
            return {"plate": video if folder.is_file() else None, "preview": None}
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return none
    preview = folder / "preview.png"
    return {"plate": meta["plate"]["path"] if Path(meta["plate"]["path"]).is_file() else None,
            "preview": str(preview) if preview.is_file() else None}
