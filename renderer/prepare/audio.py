"""Length and audio for shots driven by a plate: the final MP4 has exactly the plate's frame count at the render
fps (int(frames / plate_fps * fps), the preprocess rule), lasts exactly that many frames, and carries the plate's
audio track from time zero, trimmed or padded with silence to the video's duration — so sound cannot drift or run
past the picture (users of the official code report outputs longer than the input, audio out of sync).
"""
from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from renderer.prepare.footage import probe_plate, resampled_count


def plate_frame_count(plate, fps: int) -> int:
    info = probe_plate(plate)
    return resampled_count(info.frames, info.fps, fps)


def conform_frames(frames: np.ndarray, count: int) -> np.ndarray:
    """[F,H,W,3] -> [count,H,W,3]: trimmed, or the last frame held (clip padding can leave a render a few frames
    off the plate)."""
    if count < 1:
        raise ValueError(f"frame count must be positive, got {count}")
    if len(frames) >= count:
        return frames[:count]
    hold = np.repeat(frames[-1:], count - len(frames), axis=0)  # [count-F,H,W,3]
    return np.concatenate([frames, hold])


def has_audio(path) -> bool:
    from renderer.video_io import ffmpeg_exe

    res = subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path)], capture_output=True,
                         text=True, timeout=60)
    return "Audio:" in res.stderr


def mux_plate_audio(video, plate, out, fps: int) -> Path:
    """`video` (already the right frames) + the plate's first audio track -> `out`, atomically. The video stream is
    copied, not re-encoded; the audio is AAC, starting at 0 and exactly as long as the video. A plate without
    audio gives a silent copy."""
    from renderer.video_io import _fsync, _tmp_sibling, ffmpeg_exe, video_info

    out = Path(out)
    frames = video_info(video)["frames"]
    duration = frames / fps
    tmp = _tmp_sibling(out, ".mp4")
    cmd = [ffmpeg_exe(), "-nostdin", "-loglevel", "error", "-y", "-i", str(video), "-i", str(plate),
           "-map", "0:v:0", "-c:v", "copy", "-map_metadata", "0", "-movflags", "+faststart+use_metadata_tags"]
    if has_audio(plate):
        # apad then -t: silence fills a short track, a long one is cut at the last frame
        cmd += ["-map", "1:a:0", "-c:a", "aac", "-b:a", "192k", "-af", "apad", "-t", f"{duration:.6f}"]
    cmd += [str(tmp)]
    try:
        res = subprocess.run(cmd, capture_output=True, timeout=600)
        if res.returncode != 0:
            raise RuntimeError(f"ffmpeg failed muxing audio into {out}: {res.stderr.decode('utf-8', 'replace')[-1500:]}")
        _fsync(tmp)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def write_with_plate(frames: np.ndarray, plate, out, fps: int, metadata: dict | None = None) -> Path:
    """Rendered frames -> `out` with the plate's frame count, duration and audio."""
    from renderer.video_io import write_mp4

    frames = conform_frames(frames, plate_frame_count(plate, fps))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".mux-") as tmp:
        silent = write_mp4(frames, Path(tmp) / "video.mp4", fps, metadata=metadata)
        return mux_plate_audio(silent, plate, out, fps)


def audio_duration(path) -> float | None:
    """Duration of the first audio stream in seconds (decoded by ffmpeg), None when there is none."""
    from renderer.video_io import ffmpeg_exe

    if not has_audio(path):
        return None
    res = subprocess.run([ffmpeg_exe(), "-nostdin", "-v", "error", "-i", str(path), "-map", "0:a:0", "-f", "s16le",
                          "-ac", "1", "-ar", "48000", "-"], capture_output=True, timeout=120)
    if res.returncode != 0:
        raise ValueError(f"cannot decode audio of {path}: {res.stderr.decode('utf-8', 'replace')[-300:]}")
    return len(res.stdout) / 2 / 48000
