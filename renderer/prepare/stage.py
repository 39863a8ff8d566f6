"""The preprocessing stage: plate + character image -> the folder an Animate shot renders from.

    src_pose.mp4   the drawn skeleton at the output size and the render fps
    src_face.mp4   512 x 512 face crops, one per frame
    src_ref.png    the character image
    src_bg.mp4     replace only: the plate with the character blacked out
    src_mask.mp4   replace only: the character mask (white = character)
    keypoints.npz  per-frame person boxes [T,5] and whole-body keypoints [T,133,3] (x, y, score), plate pixels
    meta.json      fps, frames, size, models and settings, plate/image hashes, the cache key
    preview.png    sampled frames with keypoints, boxes and mask, beside pose and face

Order of work: settings, plate header and image are checked, every checkpoint is opened and checked, then the
cache is consulted — all before a frame is decoded. The folder is built under a temporary name beside `out` and
renamed into place only when complete; an existing folder with other inputs is never overwritten.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from renderer.prepare.checkpoints import CheckpointPaths
from renderer.prepare.errors import PrepareError
from renderer.prepare.footage import (PlateInfo, file_sha256, letterbox, probe_plate, read_image_rgb, read_plate,
                                      resampled_count, size_by_area)
from renderer.prepare.settings import PrepareSettings

log = logging.getLogger("wanrender.prepare")

META = "meta.json"
OUTPUTS = {"animate": ["src_pose.mp4", "src_face.mp4", "src_ref.png"],
           "replace": ["src_pose.mp4", "src_face.mp4", "src_ref.png", "src_bg.mp4", "src_mask.mp4"]}


@dataclass
class Models:
    detector: object
    pose: object
    sam2: object | None
    paths: CheckpointPaths


def load_models(checkpoint_root, settings: PrepareSettings) -> Models:
    """Open every checkpoint the mode needs (ONNX sessions, SAM2 weights) — the up-front check."""
    from renderer.prepare.detect import PersonDetector
    from renderer.prepare.pose import WholeBodyPose

    paths = CheckpointPaths.under(checkpoint_root, settings.mode == "replace")
    detector = PersonDetector(paths.detector, settings.device)
    pose = WholeBodyPose(paths.pose, settings.device)
    sam = None
    if paths.sam2 is not None:
        from omegaconf import OmegaConf

        from renderer.prepare.mask import load_sam2

        config = None
        if settings.sam2_config:
            if not Path(settings.sam2_config).is_file():
                raise PrepareError(f"prepare.sam2_config {settings.sam2_config} not found")
            config = OmegaConf.load(settings.sam2_config).model
        sam = load_sam2(paths.sam2, settings.device, config)
    return Models(detector, pose, sam, paths)


def cache_key(plate_sha: str, image_sha: str, settings: PrepareSettings, fingerprints: dict) -> str:
    blob = json.dumps({"plate": plate_sha, "image": image_sha, "settings": settings.cache_fields(),
                       "models": fingerprints, "format": 1}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def cached_folder(out: Path, key: str, mode: str) -> dict | None:
    """The meta of a complete folder at `out` made from the same inputs, or None."""
    meta_path = out / META
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if meta.get("cache_key") == key and all((out / f).is_file() for f in OUTPUTS[mode]):
        return meta
    return None


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="frame", disable=not enabled, leave=False)


def track_pose(frames: np.ndarray, models: Models, progress: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """Per frame: person box [T,5] and whole-body keypoints [T,133,3]; also how many frames had no person."""
    boxes, kps, missing = [], [], 0
    with _bar(len(frames), "pose", progress) as bar:
        for frame in frames:
            box, found = models.detector(frame)
            missing += not found
            boxes.append(box)
            kps.append(models.pose(frame, box))
            bar.update(1)
    return np.stack(boxes), np.stack(kps), missing  # [T,5], [T,133,3]


def prepare(plate, image, out, settings: PrepareSettings, checkpoint_root=None, models: Models | None = None,
            force: bool = False, progress: bool = True) -> dict:
    """Build (or reuse) the preprocessed folder at `out`. Returns its meta (meta["cached"] says which)."""
    t0 = time.time()
    settings.validate()
    out = Path(out)
    info = probe_plate(plate)  # header only
    ref = read_image_rgb(image)  # the character sheet is small: read it whole now
    if models is None:
        models = load_models(checkpoint_root, settings)  # every checkpoint checked before a frame is decoded
    plate_sha, image_sha = file_sha256(plate), file_sha256(image)
    key = cache_key(plate_sha, image_sha, settings, models.paths.fingerprint())
    meta = cached_folder(out, key, settings.mode)
    if meta is not None:
        log.info("prepare: %s already holds this preprocessing (key %s): reused", out, key)
        return {**meta, "cached": True}
    if out.exists() and not out.is_dir():
        raise PrepareError(f"out={out} is a file: the preprocessed output is a folder, choose another out=")
    if out.exists() and any(out.iterdir()) and not force:
        raise PrepareError(f"out={out} already holds something else (other inputs or an incomplete folder): choose "
                           "another out= or pass force=true (the old folder is kept beside it as .prev-*)")
    # --- the work ---
    timings = {}
    t = time.time()
    if settings.mode == "replace":
        width, height = size_by_area(info.width, info.height, settings.area[0] * settings.area[1])
        with _bar(resampled_count(info.frames, info.fps, settings.fps), "decode", progress) as bar:
            frames = read_plate(info, settings.fps, (width, height), bar.update)  # [T,H,W,3] at the output size
    else:
        # animation: the plate is analysed at its own size; the output takes the reference's shape
        width, height = size_by_area(ref.shape[1], ref.shape[0], settings.area[0] * settings.area[1])
        with _bar(resampled_count(info.frames, info.fps, settings.fps), "decode", progress) as bar:
            frames = read_plate(info, settings.fps, None, bar.update)  # [T,h,w,3]
    timings["decode"] = time.time() - t
    t = time.time()
    boxes, kps, missing = track_pose(frames, models, progress)
    timings["pose"] = time.time() - t
    result = _render_outputs(frames, boxes, kps, ref, (height, width), settings, models, progress, timings)
    meta = _meta(info, (plate, plate_sha), (image, image_sha), key, settings, models, frames, (width, height), missing, timings, t0)
    _write_folder(out, result, meta, settings, force)
    log.info("prepare: wrote %s (%d frames %dx%d @ %d fps) in %.1fs", out, len(frames), width, height,
             settings.fps, time.time() - t0)
    return {**meta, "cached": False}


def _render_outputs(frames, boxes, kps, ref, out_hw, settings, models, progress, timings) -> dict:
    from renderer.prepare.skeleton import draw_pose, face_crop, retarget

    height, width = out_hw
    t = time.time()
    faces = np.stack([face_crop(f, k, settings.face_size, settings.face_scale) for f, k in zip(frames, kps)])
    timings["face"] = time.time() - t
    t = time.time()
    draw_kps = kps
    if settings.mode == "animate" and settings.retarget:
        ref_sized = letterbox(ref, height, width)
        ref_box, _ = models.detector(ref_sized)
        ref_kp = models.pose(ref_sized, ref_box)
        draw_kps = retarget(kps, ref_kp, (height, width), (height, width))
        poses = np.stack([draw_pose(np.zeros((height, width, 3), np.uint8), k) for k in draw_kps])
    elif settings.mode == "animate":
        # drawn at the plate's size, then letterboxed into the output frame (official)
        poses = np.stack([letterbox(draw_pose(np.zeros_like(frames[0]), k), height, width) for k in kps])
    else:
        poses = np.stack([draw_pose(np.zeros_like(frames[0]), k) for k in kps])  # [T,H,W,3]
    timings["pose_draw"] = time.time() - t
    result = {"faces": faces, "poses": poses, "ref": ref, "frames": frames, "kps": kps, "boxes": boxes,
              "masks": None}
    if settings.mode == "replace":
        from renderer.prepare.mask import background, refine, track_character

        t = time.time()
        with _bar(len(frames), "mask", progress) as bar:
            raw = track_character(models.sam2, frames, kps, settings.sam_chunk, bar.update)  # [T,H,W]
        w_len, h_len = settings.mask_grid
        masks = np.stack([refine(m, settings.mask_kernel, settings.mask_iterations, w_len, h_len) for m in raw])
        result["masks"] = masks
        result["bg"] = np.stack([background(f, m) for f, m in zip(frames, masks)])  # [T,H,W,3]
        timings["mask"] = time.time() - t
    return result


def _meta(info: PlateInfo, plate, image, key, settings, models, frames, size, missing, timings, t0) -> dict:
    from renderer.output import code_version

    paths = models.paths
    return {
        "cache_key": key, "mode": settings.mode, "fps": settings.fps, "frames": int(len(frames)),
        "width": int(size[0]), "height": int(size[1]),
        "duration_s": round(len(frames) / settings.fps, 6),
        "plate": {"path": str(Path(plate[0]).resolve()), "sha256": plate[1], "fps": info.fps,
                  "frames": info.frames, "width": info.width, "height": info.height,
                  "duration_s": round(info.duration, 6)},
        "image": {"path": str(Path(image[0]).resolve()), "sha256": image[1]},
        "models": {"detector": str(paths.detector), "pose": str(paths.pose),
                   "sam2": None if paths.sam2 is None else str(paths.sam2), "fingerprints": paths.fingerprint()},
        "settings": settings.cache_fields(), "frames_without_person": int(missing),
        "files": OUTPUTS[settings.mode] + ["preview.png"],
        "timings_s": {k: round(v, 3) for k, v in timings.items()} | {"total": round(time.time() - t0, 3)},
        "code_version": code_version(),
    }


def _write_folder(out: Path, r: dict, meta: dict, settings: PrepareSettings, force: bool) -> None:
    """Everything into a temporary sibling, then one rename: `out` is either complete or not there."""
    from PIL import Image

    from renderer.prepare.preview import preview_sheet
    from renderer.video_io import write_json_atomic, write_mp4

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        tags = {"comment": f"wanrender prepare {settings.mode} {meta['cache_key']}", "ai_generated": "false"}
        write_mp4(r["poses"], tmp / "src_pose.mp4", settings.fps, metadata=tags)
        write_mp4(r["faces"], tmp / "src_face.mp4", settings.fps, metadata=tags)
        Image.fromarray(r["ref"]).save(tmp / "src_ref.png")
        if r["masks"] is not None:
            write_mp4(r["bg"], tmp / "src_bg.mp4", settings.fps, metadata=tags)
            write_mp4(np.repeat(r["masks"][..., None] * 255, 3, axis=3), tmp / "src_mask.mp4", settings.fps,
                      metadata=tags)
        sheet = preview_sheet(r["frames"], r["kps"], r["boxes"], r["poses"], r["faces"], r["masks"],
                              settings.preview_frames)
        Image.fromarray(sheet).save(tmp / "preview.png")
        np.savez_compressed(tmp / "keypoints.npz", keypoints=r["kps"], boxes=r["boxes"])
        write_json_atomic(tmp / META, meta)  # last: its presence marks the folder complete
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # an empty folder the user made for us
        if out.exists():
            if not force:
                raise PrepareError(f"out={out} appeared while preprocessing: left untouched, result discarded")
            out.rename(out.with_name(f"{out.name}.prev-{uuid.uuid4().hex[:8]}"))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
