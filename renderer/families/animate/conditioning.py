"""Conditioning and the clip loop of an Animate shot: modes animate and replace, long shots in chained clips.

    inputs (pose / face [/ background / mask] videos, reference image) -> padded to whole clips (ping-pong)
    once per shot:  CLIP features -> image context, VAE(reference) latent, text and negative-text embeddings
    per clip:       pose latents, motion tokens, condition video + mask -> y (20 ch), noise from the shot generator
                    -> denoise (guider: uncond = negative prompt AND blank face) -> decode, drop frames, chain
    output trimmed to the input length

Facts (official wan/animate.py, checked against it):
  * clips of `clip_len` = 4n+1 pixel frames; latents [16, 1 + clip_len//4 + 1 − 1 …]: frame 0 = reference;
  * inputs padded by ping-pong reflection to n·(clip_len − r) + r frames, clips start every clip_len − r frames;
  * y = [4 mask ch ; 16 latent ch] × (1 + T) frames: frame 0 = [ones ; VAE(reference)], frames 1..T = [mask ;
    VAE(condition video)]; condition video = zeros (animate) or the background (replace), its first r frames
    replaced by the previous clip's last r output frames on later clips; mask = 1 on those r frames, and in
    replace mode 1 − character mask (nearest-resized to the latent grid) elsewhere; 4 mask channels = 4 pixel
    frames per latent frame, pixel frame 0 repeated ×4;
  * decode drops latent frame 0; later clips drop their first r decoded frames;
  * one noise generator for the whole shot, continued from clip to clip.
Where diffusers' WanAnimatePipeline differs, we follow the official code: CLIP sees the letterboxed reference
(diffusers: the image as given) squashed to 224 (diffusers: resize + centre crop; clip_preprocess="diffusers" selects
it). Differences from the official code (results unchanged): CLIP features, the image context and the reference latent
are computed once per shot (official: every clip), and motion tokens once per clip (official: every forward).

Shapes: T latent frames of a clip after the reference (clip_len//4 + 1), h×w latent grid, H×W pixels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

MODES = ("animate", "replace")
REFERT = (1, 5)


# ----------------------------------------------------------------------------------------------------------
# planning a shot


def padded_length(real: int, clip_len: int, refert: int) -> int:
    """Frames after padding: the smallest n·(clip_len − r) + r ≥ real (official get_valid_len)."""
    step = clip_len - refert
    rest = (real - refert) % step
    return real if rest == 0 else real + step - rest


def ping_pong(frames: Tensor, target: int, dim: int = 1) -> Tensor:
    """Pad `frames` along `dim` to `target` by reflection without repeating the ends: 0 1 2 1 0 1 2 …"""
    n = frames.shape[dim]
    if n == 1:
        idx = [0] * target
    else:
        period = 2 * (n - 1)
        idx = [i % period if i % period < n else period - i % period for i in range(target)]
    return frames.index_select(dim, torch.tensor(idx, device=frames.device))


def clip_starts(total: int, clip_len: int, refert: int) -> list[int]:
    """First pixel frame of every clip of a padded shot of `total` frames."""
    starts, s = [], 0
    while s + refert < total:
        starts.append(s)
        s += clip_len - refert
    return starts


def latent_mask(num_latent: int, h: int, w: int, keep: int, pixel_mask: Tensor | None = None) -> Tensor:
    """The 4 mask channels of a clip: [4, num_latent, h, w] (1 = condition, 0 = generate).

    pixel_mask: [F, h, w] per pixel frame (replace mode), F = 4(num_latent − 1) + 1; its first `keep` frames are
    set to 1 (they hold the previous clip's output); pixel frame 0 fills all 4 channels of latent frame 0."""
    f = 4 * (num_latent - 1) + 1
    m = torch.zeros(f, h, w) if pixel_mask is None else pixel_mask.float().clone()  # [F, h, w]
    m[:keep] = 1.0
    m = torch.cat([m[:1].expand(4, h, w), m[1:]])  # [4·num_latent, h, w]
    return m.view(num_latent, 4, h, w).transpose(0, 1)  # [4, num_latent, h, w]


@dataclass
class AnimateInputs:
    """The preprocessed inputs, as diffusers' WanAnimatePipeline takes them; all video tensors in [-1, 1]."""
    mode: str
    reference: Tensor  # [3, H, W] the character, letterboxed to the pose video's size
    pose: Tensor  # [3, F, H, W] rendered skeleton
    face: Tensor  # [3, F, S, S] face crops
    background: Tensor | None = None  # [3, F, H, W] replace: the plate with the performer blacked out
    mask: Tensor | None = None  # [F, H, W] replace: 1 = character (to be generated)


# ----------------------------------------------------------------------------------------------------------
# what the denoising loop calls


class AnimateClipConditioner:
    """One clip's conditioning (renderer.families.spec.Conditioner): the model's keyword inputs per branch.

    cond:   x = cat[latent, y], text, pose latents, motion tokens of the face crops, image context
    uncond: the negative prompt AND blank face pixels (−1), as the official code; pose, y and image unchanged.
    Motion tokens (per clip) and the image context (per shot) are computed once here — unless FSDP shards the
    model's root (its parameters are then only whole inside a forward), where the forward computes them."""

    branches = ("cond", "uncond")

    def __init__(self, model, y: Tensor, text: Tensor, text_null: Tensor, pose: Tensor, face: Tensor,
                 image_features: Tensor, image_context: Tensor | None, *, mode: str, clip_index: int,
                 refert_num: int, need_uncond: bool):
        self.y = y  # [1, 20, 1 + T, h, w]
        self.meta = {"mode": mode, "clip": clip_index, "refert_num": refert_num}
        blank = torch.full_like(face, -1.0)  # [1, 3, Tf, S, S]
        cached = image_context is not None
        branches = {"cond": (text, face), "uncond": (text_null, blank)} if need_uncond else {"cond": (text, face)}
        self.inputs = {}
        for name, (txt, faces) in branches.items():
            kw = {"context": txt, "pose": pose}
            if cached:
                kw.update(motion=model.encode_face(faces), image_context=image_context)
            else:
                kw.update(face=faces, image_features=image_features)
            self.inputs[name] = kw

    def prepare(self, latent: Tensor) -> Tensor:
        return latent

    def after_step(self, latent: Tensor) -> Tensor:
        return latent

    def model_inputs(self, latent: Tensor, t: float, branch: str) -> dict[str, Tensor]:
        x = torch.cat([latent, self.y.to(latent.device, latent.dtype)], dim=1)  # [1, 36, 1 + T, h, w]
        return {"x": x, "t": torch.full((latent.shape[0],), float(t), device=latent.device), **self.inputs[branch]}

    def describe(self) -> dict:
        return {"task": "animate", "branches": list(self.inputs), **self.meta}


def _cacheable(model) -> bool:
    """Motion tokens can be computed outside the forward unless FSDP shards the root (its params are DTensors)."""
    from renderer.parallel.parallelize import is_sharded

    return not is_sharded(model)


# ----------------------------------------------------------------------------------------------------------
# the clip loop


@dataclass
class AnimateSettings:
    clip_len: int = 77
    refert_num: int = 1
    steps: int = 20
    shift: float = 5.0
    sampler: str = "unipc"
    guidance: float = 1.0
    clip_preprocess: str = "official"


def check_inputs(inp: AnimateInputs, s: AnimateSettings, face_size: int, stride: int = 8) -> list[tuple[str, str]]:
    """(field, problem and fix) for everything wrong with a shot's inputs, before anything is computed."""
    problems = []
    if inp.mode not in MODES:
        problems.append(("mode", f"{inp.mode!r} is not a mode: use one of {', '.join(MODES)}"))
    if s.refert_num not in REFERT:
        problems.append(("refert_num", f"{s.refert_num} is not supported: use 1 or 5"))
    if s.clip_len % 4 != 1 or s.clip_len <= s.refert_num:
        problems.append(("clip_len", f"{s.clip_len} must be 4n+1 and longer than refert_num (77 is official)"))
    _, f, h, w = inp.pose.shape
    if h % (2 * stride) or w % (2 * stride):
        problems.append(("pose_video", f"frames are {w}×{h}; width and height must be multiples of {2 * stride}"))
    if tuple(inp.reference.shape[-2:]) != (h, w):
        problems.append(("image", f"reference is {tuple(inp.reference.shape[-2:])}, letterbox it to {h}×{w}"))
    if inp.face.shape[1] != f:
        problems.append(("face_video", f"{inp.face.shape[1]} frames for {f} pose frames: give one crop per frame"))
    if tuple(inp.face.shape[-2:]) != (face_size, face_size):
        problems.append(("face_video", f"crops are {tuple(inp.face.shape[-2:])}, the model takes "
                                       f"{face_size}×{face_size}"))
    if inp.mode == "replace":
        for name, v in (("background_video", inp.background), ("mask_video", inp.mask)):
            if v is None:
                problems.append((name, "replace mode needs it (the preprocessed src_bg / src_mask video)"))
            elif v.shape[-3] != f or tuple(v.shape[-2:]) != (h, w):
                problems.append((name, f"{tuple(v.shape)} does not match the pose video's {f} frames of {w}×{h}"))
    return problems


@torch.no_grad()
def render_animate(model, vae, clip_encoder, inp: AnimateInputs, text: Tensor, text_null: Tensor,
                   s: AnimateSettings, generator: torch.Generator, *, group=None,
                   denoise_fn: Callable | None = None, on_clip: Callable[[int, int], None] | None = None,
                   timings: dict[str, float] | None = None, on_step: Callable[[int, float, int], None] | None = None,
                   ) -> Tensor:
    """Render a whole shot clip by clip. Returns the video [3, F, H, W] in [-1, 1], F = the input's frames.

    model: the Animate DiT (parallelised over `group` if any); vae: Wan2.1 VAE (encode/decode, normalised
    latents); clip_encoder: renderer.encoders.clip.CLIPVisionEncoder; text / text_null: [1, Lc, text_dim];
    generator: the shot's CPU generator (noise continues across clips); timings: seconds per stage are added to
    it (clip_encode, vae_encode, denoise, vae_decode; device-synchronised); on_step(i, t, expert) after each step."""
    from renderer.denoise import denoise
    from renderer.guidance import make_guider
    from renderer.sampling import make_sampler

    denoise_fn = denoise_fn or denoise
    cfg_parallel = group is not None and group.pcfg.cfg == 2
    guider = make_guider(group, guidance=s.guidance > 1 or cfg_parallel)
    dev = next(model.parameters()).device
    clock = _StageClock(dev, timings)
    real = inp.pose.shape[1]
    total = padded_length(real, s.clip_len, s.refert_num)
    pad = lambda v: ping_pong(v, total, dim=-3)  # noqa: E731 — frames are dim −3 of every video input
    pose, face = pad(inp.pose), pad(inp.face)
    bg = pad(inp.background) if inp.mode == "replace" else None
    keep = 1.0 - pad(inp.mask).float() if inp.mode == "replace" else None  # [F, H, W] 1 = keep the plate
    _, H, W = inp.reference.shape
    zt = s.clip_len // 4 + 1  # latent frames of a clip after the reference
    h, w = H // 8, W // 8

    # once per shot: CLIP -> image context, VAE(reference) with its all-ones mask
    with clock("clip_encode"):
        clip_fea = clip_encoder.encode(inp.reference[None].to(dev), s.clip_preprocess)  # [1, Li, image_dim]
        image_ctx = model.encode_image(clip_fea.to(dev)) if _cacheable(model) else None
    with clock("vae_encode"):
        ref_lat = vae.encode(inp.reference[None, :, None].to(dev)).float()  # [1, 16, 1, h, w]
    y_ref = torch.cat([torch.ones(1, 4, 1, h, w, device=dev), ref_lat], dim=1)  # [1, 20, 1, h, w]

    out_clips: list[Tensor] = []
    prev: Tensor | None = None  # the previous clip's output frames [3, n, H, W]
    starts = clip_starts(total, s.clip_len, s.refert_num)
    for k, start in enumerate(starts):
        sl = slice(start, start + s.clip_len)
        r = 0 if prev is None else s.refert_num
        noise = torch.randn(1, 16, zt + 1, h, w, generator=generator)  # continues the shot's stream
        if inp.mode == "replace":
            cond_video = bg[:, sl].clone()  # [3, clip_len, H, W]
            px_mask = F.interpolate(keep[sl][:, None], size=(h, w), mode="nearest")[:, 0]  # [clip_len, h, w]
        else:
            cond_video = torch.zeros(3, s.clip_len, H, W)
            px_mask = None
        if r:
            cond_video[:, :r] = prev[:, -r:].to(cond_video)
        with clock("vae_encode"):
            y_clip = torch.cat([latent_mask(zt, h, w, r, px_mask).to(dev)[None],
                                vae.encode(cond_video[None].to(dev)).float()], dim=1)  # [1, 20, T, h, w]
            pose_lat = vae.encode(pose[None, :, sl].to(dev)).float()  # [1, 16, T, h, w]
        y = torch.cat([y_ref, y_clip], dim=2)  # [1, 20, 1 + T, h, w]
        faces = face[None, :, sl].to(dev)  # [1, 3, clip_len, S, S]
        conditioner = AnimateClipConditioner(
            model, y, text.to(dev), text_null.to(dev), pose_lat, faces, clip_fea.to(dev), image_ctx,
            mode=inp.mode, clip_index=k, refert_num=s.refert_num, need_uncond=s.guidance > 1 or cfg_parallel)
        sampler = make_sampler(s.sampler, s.steps, s.shift)
        with clock("denoise"):
            latent = denoise_fn([model], conditioner, sampler, noise.to(dev), guider=guider, guidances=s.guidance,
                                group=group, callback=on_step)  # [1, 16, 1 + T, h, w]
        with clock("vae_decode"):
            video = vae.decode(latent[:, :, 1:].to(next(vae.parameters()).dtype))[0].float().cpu()  # [3, L, H, W]
        prev = video  # the next clip's first r frames: the last r decoded (the same frames as after the trim
        # whenever clip_len >= 2r, as official; short test clips, clip_len < 2r, need the untrimmed clip)
        if r:
            video = video[:, r:]
        out_clips.append(video)
        if on_clip is not None:
            on_clip(k + 1, len(starts))
    return torch.cat(out_clips, dim=1)[:, :real]  # [3, F, H, W]


class _StageClock:
    """`with clock("stage"):` adds the stage's device-synchronised seconds to `timings` (if given)."""

    def __init__(self, device: torch.device, timings: dict[str, float] | None):
        self.device, self.timings = device, timings

    def __call__(self, stage: str):
        import contextlib
        import time

        @contextlib.contextmanager
        def timed():
            sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda *_: None)
            sync(self.device)
            t0 = time.perf_counter()
            yield
            sync(self.device)
            if self.timings is not None:
                self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - t0

        return timed()
