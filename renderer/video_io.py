"""Frames and metadata in and out of the renderer: MP4 encode/decode, container tags, images, JSON sidecars.

Encoding goes through ffmpeg-python, which only builds the command line; the binary is whatever
`ffmpeg_exe()` finds (PATH first, else the one bundled with imageio-ffmpeg), so a bare machine with
no system ffmpeg still renders. Decoding uses decord. Every file this module writes is written under
a temporary name in the destination folder and moved into place with os.replace, so a crash or a
failed encode never leaves a half-written MP4 or JSON where a finished one is expected.
"""
from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

__all__ = [
    "ffmpeg_exe", "to_uint8_frames", "burn_label", "write_mp4", "read_mp4_metadata", "read_video",
    "video_info", "load_image", "write_json_atomic", "read_json", "sidecar_path", "extract_frames",
]

# Tag added to every MP4 we write, so generated media stays identifiable after it leaves the pipeline.
AI_TAG_KEY = "ai_generated"
AI_TAG_VALUE = "true"


def ffmpeg_exe() -> str:
    """Path of a working ffmpeg binary: `ffmpeg` on PATH, else the one shipped in the imageio-ffmpeg wheel.

    Checked once per process (a render group's rank checks it when it starts): the binary must run and have the
    libx264 encoder, or the next candidate is used; none usable is an environment error naming both fixes."""
    return _usable_ffmpeg(os.environ.get("PATH", ""))


@functools.lru_cache(maxsize=4)  # keyed on PATH: a changed PATH (tests, a re-activated env) is checked again
def _usable_ffmpeg(path_env: str) -> str:
    tried = []
    candidates = [shutil.which("ffmpeg", path=path_env)]
    try:
        import imageio_ffmpeg

        candidates.append(imageio_ffmpeg.get_ffmpeg_exe())
    except Exception as e:  # ImportError, or imageio-ffmpeg present but its binary missing
        tried.append(f"imageio-ffmpeg: {type(e).__name__}")
    for exe in candidates:
        if not exe:
            continue
        try:
            res = subprocess.run([exe, "-hide_banner", "-encoders"], capture_output=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as e:
            tried.append(f"{exe}: {e}")
            continue
        if res.returncode == 0 and b"libx264" in res.stdout:
            return exe
        tried.append(f"{exe}: " + ("exit %d" % res.returncode if res.returncode else "no libx264 encoder"))
    raise FileNotFoundError(errno.ENOENT, "no ffmpeg binary found: put an ffmpeg with libx264 on PATH or "
                                          "`pip install imageio-ffmpeg` (tried: " + ("; ".join(tried) or "none") + ")")


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """[3,F,H,W] or [1,3,F,H,W] float in [-1,1] -> [F,H,W,3] uint8 (values clamped, then rounded)."""
    if video.dim() == 5:
        if video.shape[0] != 1:
            raise ValueError(f"expected a batch of one video, got shape {tuple(video.shape)}")
        video = video[0]
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"expected [3,F,H,W] or [1,3,F,H,W], got shape {tuple(video.shape)}")
    # float32 first: bf16/fp16 lack precision for the scale-and-round, and the VAE may leave NaNs at the edges
    # of a bad decode, which would otherwise become arbitrary bytes. The math runs where the video is (the GPU
    # after a decode) and only the uint8 frames cross to the host: a quarter of the bytes.
    v = torch.nan_to_num(video.detach().to(torch.float32), nan=0.0)
    v = ((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)  # [3, F, H, W]
    return v.permute(1, 2, 3, 0).contiguous().cpu().numpy()  # [F, H, W, 3]


def _label_stamper(h: int, w: int, text: str):
    """Return a function that draws `text` in the bottom-left corner of one [h,w,3] uint8 frame."""
    from PIL import Image, ImageDraw, ImageFont

    # Scale the font with the frame so the label stays "small" on 1280x720 and still legible on tiny
    # test clips; size= needs FreeType, without it Pillow's fixed bitmap font is used.
    try:
        font = ImageFont.load_default(size=max(8, h // 36))
    except Exception:
        font = ImageFont.load_default()
    x0, y0, x1, y1 = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font)
    pad, margin = 2, max(2, h // 90)
    box = (margin, h - margin - (y1 - y0) - 2 * pad, margin + (x1 - x0) + 2 * pad, h - margin)

    def stamp(frame: np.ndarray) -> np.ndarray:
        im = Image.fromarray(frame)
        draw = ImageDraw.Draw(im)
        # Dark box behind white text: readable on any content, bright or dark.
        draw.rectangle(box, fill=(0, 0, 0))
        draw.text((box[0] + pad - x0, box[1] + pad - y0), text, font=font, fill=(255, 255, 255))
        return np.asarray(im)

    return stamp


def burn_label(frames: np.ndarray, text: str) -> np.ndarray:
    """Return a copy of [F,H,W,3] uint8 frames with `text` drawn in the bottom-left corner of each frame."""
    stamp = _label_stamper(frames.shape[1], frames.shape[2], text)
    return np.stack([stamp(f) for f in frames]) if len(frames) else frames.copy()


def _tmp_sibling(path: Path, suffix: str = "") -> Path:
    # Same folder as the target so os.replace is a same-filesystem rename (atomic); pid + random part so
    # concurrent writers (processes or threads) never share a temp file. Leading dot hides it from globs.
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}")


def _fsync(path: Path) -> None:
    # Data on disk before the rename: otherwise a power cut can leave the final name pointing at zeros.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_frame(frame: np.ndarray, shape: tuple | None) -> np.ndarray:
    frame = np.asarray(frame)
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"frames must be uint8 [H,W,3], got {frame.dtype} {frame.shape}")
    if shape is not None and frame.shape != shape:
        raise ValueError(f"inconsistent frame shape: {frame.shape} after {shape}")
    return np.ascontiguousarray(frame)


def write_mp4(
    frames: np.ndarray | Iterable[np.ndarray],
    path,
    fps: int,
    metadata: dict[str, str] | None = None,
    label=None,
    crf: int = 18,
) -> Path:
    """Encode uint8 RGB frames ([F,H,W,3] array, or an iterable of [H,W,3]) to H.264/yuv420p MP4 at `path`.

    metadata: container tags (title, comment, description, or any key such as "seed"); values are
    stringified. An "ai_generated" tag is always written ("true" unless the caller gave one).
    label: text burned into the bottom-left corner of every frame before encoding, or a function applied to
    each [H,W,3] frame (renderer.label.make_stamper: the configurable CJK label).
    Odd width or height is a ValueError: yuv420p subsamples chroma 2x2, and silently padding would
    change the size the caller asked for.
    Atomic: the final name appears only once encoding succeeded and the file was read back complete
    (frame count and frame rate, hence duration); on failure the temp file is removed and whatever was at
    `path` before is left untouched. A full disk is raised as OSError(ENOSPC), whatever ffmpeg said.
    """
    import ffmpeg  # ffmpeg-python: builds the argv, we run it

    path = Path(path)
    if not (isinstance(fps, int) and fps > 0):
        raise ValueError(f"fps must be a positive int, got {fps!r}")
    if not 0 <= crf <= 51:
        raise ValueError(f"crf must be in [0, 51] for libx264, got {crf}")
    tags = {str(k): str(v) for k, v in (metadata or {}).items()}
    for k in tags:
        # ffmpeg splits `-metadata key=value` at the first '='.
        if not k or "=" in k or "\n" in k:
            raise ValueError(f"invalid metadata key {k!r}")
    tags.setdefault(AI_TAG_KEY, AI_TAG_VALUE)

    if isinstance(frames, np.ndarray):
        if frames.ndim != 4:
            raise ValueError(f"frames must be [F,H,W,3], got shape {frames.shape}")
    it = iter(frames)
    first = next(it, None)
    if first is None:
        raise ValueError("no frames to write")
    first = _check_frame(first, None)
    h, w, _ = first.shape
    if h % 2 or w % 2:
        raise ValueError(f"yuv420p needs even width and height, got {w}x{h}; crop or pad the frames")
    # Frames are streamed to ffmpeg one at a time (labelled on the way), so a long clip is never
    # copied whole and an iterable can be a generator straight off the VAE.
    stamp = label if callable(label) else _label_stamper(h, w, label) if label else (lambda fr: fr)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path, ".mp4")
    # ffmpeg-python 0.2.0 turns kwargs into options and cannot repeat one, but ffmpeg reads
    # `-metadata:g<anything>` as a global tag (it ignores what follows the `g` specifier), so each tag
    # gets its own key. use_metadata_tags stores arbitrary keys (seed, ai_generated) as mdta atoms that
    # would otherwise be dropped; faststart puts the index first so browsers can stream the file.
    meta_kwargs = {f"metadata:g:{i}": f"{k}={v}" for i, (k, v) in enumerate(tags.items())}
    stream = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{w}x{h}", framerate=fps)
    stream = ffmpeg.output(
        stream, str(tmp), format="mp4", vcodec="libx264", pix_fmt="yuv420p", crf=crf, r=fps,
        movflags="+use_metadata_tags+faststart", **meta_kwargs,
    )
    argv = ffmpeg.compile(stream.global_args("-nostdin", "-loglevel", "error"), cmd=ffmpeg_exe(),
                          overwrite_output=True)
    # stderr goes to a file, not a pipe: a pipe nobody reads while we block writing stdin can deadlock.
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err)
        try:
            broken = False
            written = 0
            try:
                shape = first.shape
                proc.stdin.write(stamp(first).tobytes())
                written = 1
                for frame in it:
                    proc.stdin.write(stamp(_check_frame(frame, shape)).tobytes())
                    written += 1
                proc.stdin.close()
            except BrokenPipeError:
                broken = True  # ffmpeg died early; its exit code and stderr below say why
            rc = proc.wait()
            if rc != 0 or broken:
                err.seek(0)
                msg = err.read().decode("utf-8", "replace").strip()[-2000:]
                if "No space left on device" in msg or "Disk quota exceeded" in msg:
                    raise OSError(errno.ENOSPC, f"No space left on device writing {path} (ffmpeg: {msg[-300:]})")
                raise RuntimeError(f"ffmpeg failed writing {path} (exit {rc}): {msg}")
            _fsync(tmp)
            _check_written(tmp, path, written, fps)
            os.replace(tmp, path)
        except BaseException:
            # Covers our own errors and KeyboardInterrupt: stop the encoder, never leave the temp behind.
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stdin and not proc.stdin.closed:
                try:
                    proc.stdin.close()
                except OSError:
                    pass
            tmp.unlink(missing_ok=True)
            raise
    return path


def _check_written(tmp: Path, path: Path, frames: int, fps: int) -> None:
    """Read the encoded file back before it gets its final name: every frame there, at the asked frame rate."""
    try:
        info = video_info(tmp)
    except (ValueError, FileNotFoundError) as e:
        raise RuntimeError(f"the MP4 written for {path} cannot be read back ({e}): not kept") from e
    if info["frames"] != frames or abs(info["fps"] - fps) > 1e-3 * fps:
        raise RuntimeError(f"the MP4 written for {path} is incomplete: {info['frames']} frames at {info['fps']:g} "
                           f"fps read back, {frames} at {fps} written: not kept")


def _parse_ffmetadata(text: str) -> dict[str, str]:
    # ffmetadata escapes '=', ';', '#', '\\' and newline with a backslash; a value spanning lines
    # shows up as a backslash before the newline. Walk characters so escapes are honoured everywhere.
    out: dict[str, str] = {}
    lines, cur, i = [], [], 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            cur.append(("\\", text[i + 1]))
            i += 2
            continue
        if c == "\n":
            lines.append(cur)
            cur = []
        else:
            cur.append(("", c))
        i += 1
    lines.append(cur)
    for line in lines:
        if not line or line[0] in (("", ";"), ("", "#")):
            continue  # blank, header or comment
        if line[0] == ("", "["):
            break  # a [STREAM]/[CHAPTER] section: everything from here on is not a global tag
        try:
            eq = line.index(("", "="))
        except ValueError:
            continue
        key = "".join(c for _, c in line[:eq])
        out[key] = "".join(c for _, c in line[eq + 1:])
    return out


def read_mp4_metadata(path) -> dict[str, str]:
    """Global container tags of a media file, as written (plus muxer ones: encoder, major_brand, ...)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such video: {path}")
    res = subprocess.run(
        [ffmpeg_exe(), "-nostdin", "-v", "error", "-i", str(path), "-f", "ffmetadata", "-"],
        capture_output=True,
    )
    if res.returncode != 0:
        raise ValueError(f"cannot read metadata of {path}: {res.stderr.decode('utf-8', 'replace').strip()}")
    return _parse_ffmetadata(res.stdout.decode("utf-8", "replace"))


def _video_reader(path, width: int = -1, height: int = -1):
    """decord VideoReader for `path`; missing -> FileNotFoundError, undecodable -> ValueError, both naming it."""
    import decord

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such video: {path}")
    try:
        return decord.VideoReader(str(path), ctx=decord.cpu(0), width=width, height=height)
    except Exception as e:  # decord raises its own DECORDError for anything it cannot demux/decode
        raise ValueError(f"cannot decode video {path}: {e}") from e


def read_video(path, num_frames: int | None = None, size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode a video to [F,H,W,3] uint8 RGB with decord.

    num_frames: only the first `num_frames` frames (more than the video has is a ValueError).
    size: (width, height) to resize to while decoding (plain resize, aspect ratio not kept).
    """
    w, h = size if size is not None else (-1, -1)
    vr = _video_reader(path, w, h)
    n = len(vr)
    if num_frames is not None:
        if not 0 < num_frames <= n:
            raise ValueError(f"{path} has {n} frames, asked for {num_frames}")
        n = num_frames
    return _get_batch(vr, path, list(range(n)), size)


def _get_batch(vr, path, idx: list[int], size: tuple[int, int] | None = None) -> np.ndarray:
    """vr.get_batch, falling back to ffmpeg where decord cannot copy the frame (it fails on frames whose RGB row
    is not 64-byte aligned, e.g. 48-pixel-wide portrait clips)."""
    try:
        return vr.get_batch(idx).asnumpy()
    except Exception:  # decord's DECORDError
        frames = _ffmpeg_decode(path, size)
        return frames[idx]


def _ffmpeg_decode(path, size: tuple[int, int] | None = None) -> np.ndarray:
    """Every frame of `path` as [F,H,W,3] uint8 RGB through the ffmpeg binary (slower than decord, always works)."""
    info = video_info(path)
    w, h = size if size is not None else (info["width"], info["height"])
    cmd = [ffmpeg_exe(), "-v", "error", "-i", str(path), "-vf", f"scale={w}:{h}", "-f", "rawvideo",
           "-pix_fmt", "rgb24", "-"]
    res = subprocess.run(cmd, capture_output=True, timeout=600)
    if res.returncode != 0:
        raise ValueError(f"cannot decode video {path}: {res.stderr.decode('utf-8', 'replace').strip()}")
    return np.frombuffer(res.stdout, np.uint8).reshape(-1, h, w, 3)


def video_info(path) -> dict:
    """{"frames", "width", "height", "fps"} of a video, via decord."""
    vr = _video_reader(path)
    h, w, _ = vr[0].shape
    return {"frames": len(vr), "width": int(w), "height": int(h), "fps": float(vr.get_avg_fps())}


def extract_frames(path, indices: list[int]) -> list[np.ndarray]:
    """Decode the frames at `indices` (negative counts from the end, like Python) as [H,W,3] uint8."""
    vr = _video_reader(path)
    n = len(vr)
    idx = []
    for i in indices:
        if not -n <= i < n:
            raise IndexError(f"frame {i} out of range for {path} ({n} frames)")
        idx.append(i % n)
    if not idx:
        return []
    batch = _get_batch(vr, path, idx)
    return [batch[k] for k in range(len(idx))]


def open_rgb(path):
    """Image file -> an RGB PIL image (EXIF rotation applied, transparency over white). ValueError if unreadable."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such image: {path}")
    try:
        with Image.open(path) as im:
            im.load()  # Image.open is lazy; truncated files only fail here
            # Phone photos store rotation in EXIF; without this the conditioning frame comes out sideways.
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                # Transparent areas over white, not over whatever RGB hides under alpha=0 (often black).
                rgba = im.convert("RGBA")
                bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, rgba)
            im = im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    return im


def load_image(path, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Image file -> [3,H,W] float32 in [-1,1]; with size=(width, height), resize to cover then center-crop."""
    from PIL import Image

    im = open_rgb(path)
    if size is not None:
        tw, th = size
        if tw <= 0 or th <= 0:
            raise ValueError(f"size must be positive (width, height), got {size}")
        # Scale so the image covers the target in both dimensions, then crop the overflow evenly:
        # keeps the aspect ratio (no squashed faces) at the cost of the edges.
        scale = max(tw / im.width, th / im.height)
        rw, rh = max(tw, round(im.width * scale)), max(th, round(im.height * scale))
        im = im.resize((rw, rh), Image.Resampling.BICUBIC)
        left, top = (rw - tw) // 2, (rh - th) // 2
        im = im.crop((left, top, left + tw, top + th))
    arr = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def write_json_atomic(path, obj) -> Path:
    """Write `obj` as UTF-8 JSON (indented, non-ASCII kept) via temp file + os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Serialise first: an unserialisable object then fails before any file is touched.
    # allow_nan=False: NaN / Infinity are not JSON (jq and browsers reject the file); fail before writing instead
    text = json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=False, allow_nan=False) + "\n"
    tmp = _tmp_sibling(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_json(path) -> dict:
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def sidecar_path(mp4_path) -> Path:
    """"<out>/<shot>.mp4" -> "<out>/<shot>.json": the JSON that describes how a clip was made."""
    return Path(mp4_path).with_suffix(".json")
