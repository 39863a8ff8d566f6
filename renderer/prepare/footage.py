"""The plate: its header, the frames resampled to the render fps, the size rule, letterboxing, content hashes.

Facts from the official preprocess (wan/modules/animate/preprocess): the output frame count is
int(frames / plate_fps * fps) and frame i is plate frame round(i / fps * plate_fps); the size comes from a target
area with sides divisible by 16. (The official `calculate_new_size` search raises on every call — it passes three
arguments to a two-argument helper — so what actually runs is its fallback: height sqrt(area / aspect), width
area / height, each floored to a multiple of 16, the frame letterboxed into that box. We implement what runs.)
"""
from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from renderer.prepare.errors import PrepareError

log = logging.getLogger("wanrender.prepare")

@dataclass(frozen=True)
class PlateInfo:
    path: str
    frames: int
    fps: float
    width: int
    height: int

    @property
    def duration(self) -> float:
        return self.frames / self.fps


def probe_plate(path) -> PlateInfo:
    """The plate's header through decord, without decoding the frames: a clear PrepareError if it is unusable."""
    import decord

    path = Path(path)
    if not path.is_file():
        raise PrepareError(f"plate not found: {path}")
    try:
        vr = decord.VideoReader(str(path), ctx=decord.cpu(0))
        n, fps = len(vr), float(vr.get_avg_fps())
        h, w = vr[0].shape[:2]
        # variable-frame-rate plates can report a count far from duration x fps; trust the clock then (official)
        expected = int(float(vr.get_frame_timestamp(n - 1)[-1]) * fps + 0.5) if n else 0
        if n and expected and abs(n - expected) / n > 0.1:
            log.warning("plate %s: %d frames but %.2f s at %.3f fps; using %d", path, n, expected / fps, fps, expected)
            n = min(n, expected)
    except Exception as e:  # decord's DECORDError on anything it cannot demux
        raise PrepareError(f"plate {path} is not a readable video: {str(e)[:200]}") from e
    if n < 1 or not math.isfinite(fps) or fps <= 0:
        raise PrepareError(f"plate {path} has {n} frames at {fps} fps: re-export it with a constant frame rate")
    return PlateInfo(str(path), n, fps, int(w), int(h))


def resampled_count(frames: int, plate_fps: float, fps: float) -> int:
    """Frames the plate has at the render fps (official rule: int(frames / plate_fps * fps), the plate's duration
    never exceeded)."""
    return max(1, int(frames / plate_fps * fps + 1e-9))


def resample_indices(frames: int, plate_fps: float, fps: float) -> list[int]:
    """Plate frame shown at each render-fps tick: round(i / fps * plate_fps), clipped to the plate."""
    n = resampled_count(frames, plate_fps, fps)
    idx = np.round(np.arange(n) / fps * plate_fps).astype(np.int64)  # [n]
    return np.clip(idx, 0, frames - 1).tolist()


def size_by_area(width: int, height: int, area: int, divisor: int = 16) -> tuple[int, int]:
    """(W, H) with W*H about `area`, the aspect ratio of width x height, both sides floored to `divisor`."""
    if width <= 0 or height <= 0 or area < divisor * divisor:
        raise PrepareError(f"cannot size a {width}x{height} frame to area {area}: both must be positive, "
                           f"area at least {divisor * divisor}")
    aspect = width / height
    new_h = math.sqrt(area / aspect)
    new_w = area / new_h
    w, h = int(new_w // divisor) * divisor, int(new_h // divisor) * divisor
    return max(w, divisor), max(h, divisor)


def letterbox(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Fit `image` [h,w,C] inside height x width keeping its aspect ratio, centred on black (official
    padding_resize)."""
    import cv2

    h, w = image.shape[:2]
    out = np.zeros((height, width) + image.shape[2:], np.uint8)  # [H,W,C]
    if h / w > height / width:  # taller than the box: full height, pad left/right
        nw = max(1, int(height / h * w))
        interp = cv2.INTER_AREA if nw < w else cv2.INTER_LINEAR
        fit = cv2.resize(image, (nw, height), interpolation=interp).reshape((height, nw) + image.shape[2:])
        x0 = (width - nw) // 2
        out[:, x0:x0 + nw] = fit
    else:
        nh = max(1, int(width / w * h))
        interp = cv2.INTER_AREA if nh < h else cv2.INTER_LINEAR
        fit = cv2.resize(image, (width, nh), interpolation=interp).reshape((nh, width) + image.shape[2:])
        y0 = (height - nh) // 2
        out[y0:y0 + nh] = fit
    return out


def read_plate(info: PlateInfo, fps: float, size: tuple[int, int] | None = None, progress=None) -> np.ndarray:
    """The plate's frames at `fps` as [T,H,W,3] uint8 RGB; letterboxed to size=(W,H) when given."""
    import decord

    from renderer.video_io import _get_batch

    idx = resample_indices(info.frames, info.fps, fps)
    vr = decord.VideoReader(info.path, ctx=decord.cpu(0))
    chunks = []
    for start in range(0, len(idx), 64):  # decode in chunks so progress moves on a long plate
        part = _get_batch(vr, info.path, idx[start:start + 64])  # [<=64,h,w,3]
        if size is not None and (part.shape[2], part.shape[1]) != tuple(size):
            part = np.stack([letterbox(f, size[1], size[0]) for f in part])  # [<=64,H,W,3]
        chunks.append(part)
        if progress is not None:
            progress(len(part))
    return np.concatenate(chunks)  # [T,H,W,3]


def read_image_rgb(path) -> np.ndarray:
    """The character image as [H,W,3] uint8 RGB (EXIF rotation applied, alpha over white)."""
    from renderer.video_io import load_image

    try:
        img = load_image(path)  # [3,H,W] in [-1,1]
    except (FileNotFoundError, ValueError) as e:
        raise PrepareError(f"image: {e}") from e
    return ((img.permute(1, 2, 0).numpy() + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)  # [H,W,3]


def file_sha256(path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
