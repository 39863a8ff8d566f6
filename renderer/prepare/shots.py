"""Animate / replace shots on the farm: checking their inputs up front, the clip plan and an estimate, and the
preprocessing a shot gets before it is rendered (cached by content hash under the job's output folder).

A shot gives either a raw plate (`video`, preprocessed here) or a folder `prepare` already made (`video` pointing
at a folder holding meta.json). Clips (official): 77 frames each, the next starting 77 - refert_num frames later,
so n clips cover n * (77 - r) + r frames; refert_num is 1 or 5.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from renderer.prepare.errors import PrepareError
from renderer.prepare.footage import probe_plate, resampled_count
from renderer.prepare.stage import META, OUTPUTS

CLIP_FRAMES = 77
REFERT_CHOICES = (1, 5)
ANIMATE_TASKS = ("animate", "replace")
# Cost model from two facts in shared/design/animate.md: one forward is 6.60 PFLOP at 1280x720 (75,600 tokens) and
# 1.71 PFLOP at 832x480 (32,760 tokens); a + b*L fits both per token (linear layers + attention). The official
# model runs at 470 TFLOP/s effective on one H200 (14.04 s per 720p forward, measured).
_L720, _F720, _L480, _F480 = 75_600, 6.60e15, 32_760, 1.71e15
_B = (_F720 / _L720 - _F480 / _L480) / (_L720 - _L480)
_A = _F480 / _L480 - _B * _L480
H200_EFFECTIVE_FLOPS = 470e12


@dataclass(frozen=True)
class ClipPlan:
    frames: int          # output frames (the plate's count at the render fps)
    clips: int
    padded_frames: int   # what the clips cover: clips * (77 - r) + r
    refert_num: int
    tokens: int          # DiT tokens per forward (21 latent frames incl. the reference)
    pflop_per_forward: float
    forwards: int
    h200_seconds: float  # DiT only, one H200, at the measured official efficiency
    width: int = 0       # the output's size (the prepared folder's; for a raw plate, what prepare will choose)
    height: int = 0

    def describe(self) -> str:
        return (f"{self.frames} frames -> {self.clips} clip(s) of {CLIP_FRAMES} (refert_num {self.refert_num}), "
                f"{self.forwards} DiT forwards of {self.pflop_per_forward:.2f} PFLOP, "
                f"~{self.h200_seconds / 60:.1f} min of DiT on one H200")


def clip_plan(frames: int, width: int, height: int, refert_num: int = 1, steps: int = 20,
              guidance: float = 1.0) -> ClipPlan:
    if refert_num not in REFERT_CHOICES:
        raise PrepareError(f"refert_num={refert_num}: use 1 or 5 (frames each clip takes from the one before)")
    clips = max(1, math.ceil((frames - refert_num) / (CLIP_FRAMES - refert_num)))
    tokens = ((CLIP_FRAMES - 1) // 4 + 2) * (height // 16) * (width // 16)  # 20 + 1 reference latent frames
    flop = _A * tokens + _B * tokens * tokens
    forwards = clips * steps * (2 if guidance > 1 else 1)  # guidance > 1: a second (uncond) forward per step
    return ClipPlan(frames, clips, clips * (CLIP_FRAMES - refert_num) + refert_num, refert_num, tokens,
                    flop / 1e15, forwards, forwards * flop / H200_EFFECTIVE_FLOPS, width, height)


def check_preprocessed(folder: Path, task: str) -> tuple[dict, list[tuple[str, str]]]:
    """(meta, problems) of a folder `prepare` made: the files the task needs, readable, matching frame counts."""
    from renderer.video_io import video_info

    problems = []
    try:
        import json

        meta = json.loads((folder / META).read_text())
    except (OSError, ValueError) as e:
        return {}, [("video", f"{folder} is a folder but not a preprocessed one ({META}: {e}): give the raw plate, "
                              "or run `wanrender prepare` into it first")]
    need = OUTPUTS["replace" if task == "replace" else "animate"]
    for name in need:
        if not (folder / name).is_file():
            fix = "prepare it with mode=replace" if task == "replace" else "run `wanrender prepare` again"
            problems.append(("video", f"{folder} has no {name} ({task} needs it): {fix}"))
            continue
        if name.endswith(".mp4"):
            try:
                info = video_info(folder / name)
            except (OSError, ValueError) as e:
                problems.append(("video", f"{folder / name} is not readable: {e}"))
                continue
            if info["frames"] != meta.get("frames"):
                problems.append(("video", f"{folder / name} has {info['frames']} frames, meta.json says "
                                          f"{meta.get('frames')}: the folder is damaged, prepare it again"))
            if name == "src_face.mp4" and (info["width"], info["height"]) != (512, 512):
                problems.append(("video", f"{folder / name} is {info['width']}x{info['height']}; face crops must be "
                                          "512x512"))
    return meta, problems


def check_animate_shot(task: str, video: str | None, image: str | None, mask: str | None = None,
                       refert_num=1, fps: int = 30, area=(1280, 720), steps: int = 20,
                       guidance: float = 1.0) -> tuple[ClipPlan | None, list[tuple[str, str]]]:
    """Every problem of an animate/replace shot's inputs as (field, message), reading only headers; and the clip
    plan when the inputs are usable."""
    from renderer.prepare.footage import read_image_rgb, size_by_area

    problems: list[tuple[str, str]] = []
    if isinstance(guidance, (list, tuple)):
        guidance = max(guidance)
    if task not in ANIMATE_TASKS:
        return None, [("task", f"{task!r} is not an Animate task: use animate or replace")]
    if isinstance(refert_num, bool) or refert_num not in REFERT_CHOICES:
        problems.append(("refert_num", f"refert_num={refert_num!r}: use 1 or 5 (frames each clip takes from the "
                                       "one before)"))
        refert_num = 1
    ref_hw = None
    if not image:
        problems.append(("image", f"{task} needs `image`: the character to put in the shot"))
    else:
        try:
            ref_hw = read_image_rgb(image).shape[:2]
        except PrepareError as e:
            problems.append(("image", f"{e}: check the path"))
    if mask and task == "animate":
        problems.append(("mask", "animate takes no mask (the character is drawn from the pose): remove `mask` or "
                                 "use task: replace"))
    elif mask and not Path(mask).is_file():
        problems.append(("mask", f"mask {mask} does not exist: check the path"))
    plan = None
    if not video:
        problems.append(("video", f"{task} needs `video`: the plate (performer's footage) or a folder made by "
                                  "`wanrender prepare`"))
    elif Path(video).is_dir():
        meta, folder_problems = check_preprocessed(Path(video), task)
        problems += folder_problems
        if meta and not folder_problems:
            plan = clip_plan(meta["frames"], meta["width"], meta["height"], refert_num, steps, guidance)
    else:
        try:
            info = probe_plate(video)
        except PrepareError as e:
            problems.append(("video", f"{e}: give a readable plate (mp4/mov) or a prepared folder"))
        else:
            frames = resampled_count(info.frames, info.fps, fps)
            src_w, src_h = (info.width, info.height) if task == "replace" or ref_hw is None else ref_hw[::-1]
            w, h = size_by_area(src_w, src_h, area[0] * area[1])
            plan = clip_plan(frames, w, h, refert_num, steps, guidance)
    return (plan if not problems else None), problems


def prepared_folder(video: str, image: str, task: str, cache_root, settings, checkpoint_root, progress=False):
    """The preprocessed folder for a shot: `video` itself when it already is one, else `prepare` run into
    <cache_root>/<cache key> — a resubmitted shot with the same plate, image and settings finds it there."""
    from dataclasses import replace

    from renderer.prepare.stage import cache_key, load_models, prepare
    from renderer.prepare.footage import file_sha256

    if Path(video).is_dir():
        return Path(video)
    s = replace(settings, mode="replace" if task == "replace" else "animate")
    models = load_models(checkpoint_root, s)
    key = cache_key(file_sha256(video), file_sha256(image), s, models.paths.fingerprint())
    folder = Path(cache_root) / key
    prepare(video, image, folder, s, models=models, progress=progress)
    return folder
