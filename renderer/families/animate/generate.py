"""`wanrender generate model=animate_14b|tiny_animate mode=animate|replace image=... pose_video=... face_video=...
[background_video=... mask_video=...]`: one Animate shot from the preprocessed inputs to an MP4 and its sidecar.

    check every input (files, frame counts, sizes, mode, refert_num, LoRAs) -> exit 2 with one line per problem,
    before any model is loaded
    -> text encoder, VAE, CLIP, DiT (+ LoRAs, merged or unmerged) -> clips (conditioning.render_animate)
    -> <out>/<name>.mp4 + <out>/<name>.json, both written atomically (temporary name, then rename)

Inputs are what the official preprocess_data.py writes (src_ref.png, src_pose.mp4, src_face.mp4, and for replace
src_bg.mp4, src_mask.mp4 with white = character). The reference image is letterboxed to the pose video's size as
the official code does. The output has the pose video's frame count and size.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from renderer.families.animate.conditioning import MODES, AnimateInputs, AnimateSettings, check_inputs

OFFICIAL_PROMPT = "视频中的人在做动作"  # the official default prompt ("the person in the video is moving")
CLIP_PTH = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
RELIGHTING_LORA = "relighting_lora.ckpt"


def letterbox(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[3, h, w] in [-1, 1] -> [3, height, width]: aspect kept, black (−1) bars, centred (official padding_resize)."""
    _, h, w = image.shape
    if h / w > height / width:
        nh, nw = height, int(height / h * w)
    else:
        nh, nw = int(width / w * h), width
    scaled = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]  # [3, nh, nw]
    out = torch.full((3, height, width), -1.0)
    top, left = (height - nh) // 2, (width - nw) // 2
    out[:, top:top + nh, left:left + nw] = scaled
    return out


def _video(path: str) -> torch.Tensor:
    from renderer.video_io import read_video

    return torch.from_numpy(read_video(path)).permute(3, 0, 1, 2).float() / 127.5 - 1  # [3, F, H, W]


def parse_loras(spec, checkpoint: str | None) -> list[tuple[str, float]]:
    """`loras` config: a list of "path" or "path:scale"; "relighting" = the checkpoint's relighting_lora.ckpt."""
    out = []
    for item in list(spec or []):
        path, _, scale = str(item).rpartition(":") if ":" in str(item) else (str(item), "", "1")
        if path == "relighting":
            if checkpoint is None:
                raise ValueError("loras: 'relighting' needs model.checkpoint (the folder holding relighting_lora.ckpt)")
            path = str(Path(checkpoint) / RELIGHTING_LORA)
        try:
            out.append((path, float(scale)))
        except ValueError as e:
            raise ValueError(f"loras: {item!r}: the scale after ':' must be a number") from e
    return out


def animate_tier(quality, random_weights: bool):
    """(the quality tier as an Animate shot runs it, [(LoRA path, scale)] it merges, problems). quality: the config's
    `quality` node (a dict of conf/quality fields) or a TierSettings. Exact and draft render Animate shots; fast
    (step cache, FP8 linears) is not wired into the clip loop. A draft on real weights needs its LoRA file: checked
    here, before anything loads."""
    from renderer.tiers import TierError, TierSettings, tier_from_dict

    try:
        tier = quality if isinstance(quality, TierSettings) else (
            tier_from_dict(dict(quality)) if quality else TierSettings())
        tier = tier.for_family("animate")
        if tier.name == "fast":
            return tier, [], [("quality", "fast is not available for Animate shots (its step cache and FP8 layers "
                                          "are not in the clip loop): use quality=draft or quality=exact")]
        files = tier.loras_per_expert(1, random_weights=random_weights)[0]
    except TierError as e:
        return None, [], [("quality.lora_dir" if "lora_dir" in str(e) or "LoRA file" in str(e) else "quality", str(e))]
    return tier, [(str(p), s) for p, s in files], []


def read_inputs(cfg, face_size: int) -> tuple[AnimateInputs | None, list[tuple[str, str]]]:
    """The shot's inputs from the config, or the problems (field, message) that stop it."""
    problems = []
    mode = cfg.get("mode") or "animate"
    if mode not in MODES:
        return None, [("mode", f"{mode!r} is not a mode: use mode=animate or mode=replace")]
    need = ["image", "pose_video", "face_video"] + (["background_video", "mask_video"] if mode == "replace" else [])
    for key in need:
        v = cfg.get(key)
        if not v:
            problems.append((key, f"missing: give {key}=<file> (the preprocessed input)"))
        elif not Path(v).is_file():
            problems.append((key, f"{v} does not exist"))
    if problems:
        return None, problems
    try:
        pose = _video(cfg.pose_video)
        face = _video(cfg.face_video)
        bg = _video(cfg.background_video) if mode == "replace" else None
        mask = (_video(cfg.mask_video)[0] > 0).float() if mode == "replace" else None  # white = character
        from renderer.video_io import load_image

        ref = letterbox(load_image(cfg.image), pose.shape[2], pose.shape[3])
    except (ValueError, RuntimeError, OSError) as e:
        return None, [("inputs", f"cannot read an input: {e}")]
    return AnimateInputs(mode, ref, pose, face, bg, mask), problems


def _components(preset, checkpoint: str | None, device: torch.device, dtype: torch.dtype, random_weights: bool,
                t5_device: torch.device | None = None):
    """(text encoder, VAE, CLIP encoder, DiT): from the checkpoint folder (either layout) or random weights.
    t5_device: where the text encoder lives (render.t5_cpu=true: the CPU, saving 11 GB of GPU memory)."""
    t5_device = t5_device or device
    from renderer.encoders.clip import CLIPVisionConfig, CLIPVisionEncoder, load_clip
    from renderer.encoders.text import build_random_umt5_xxl, build_tiny_text_encoder, load_text_encoder
    from renderer.families.animate.checkpoint import animate_folder, load_animate
    from renderer.families.animate.model import build_animate
    from renderer.vae import build_vae, load_vae

    clip_cfg = CLIPVisionConfig(**preset.extra.get("clip", {}))
    if checkpoint is None:
        seed = preset.seed_weights
        text = (build_tiny_text_encoder(seed=seed, d_model=preset.dit.text_dim) if preset.is_tiny
                else build_random_umt5_xxl(t5_device, dtype, seed=seed))
        vae_dtype = torch.float32 if preset.is_tiny or device.type != "cuda" else dtype
        vae = build_vae("2.1", tiny=preset.vae.tiny, dtype=vae_dtype, device=device, seed=seed)
        gen = torch.Generator().manual_seed(seed + 1)
        clip = CLIPVisionEncoder(clip_cfg)
        with torch.no_grad():
            for p in clip.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        clip = clip.to(device=device, dtype=dtype).eval()
        return text, vae, clip, build_animate(preset.dit, dtype=dtype, device=device, seed=seed)
    root = Path(checkpoint)
    layout, _ = animate_folder(root)
    text = load_text_encoder(root, device=t5_device, dtype=dtype if t5_device.type == "cuda" else torch.float32)
    vae = load_vae(root / "vae" if layout == "diffusers" else root / "Wan2.1_VAE.pth", version="2.1", dtype=dtype,
                   device=device)
    clip = load_clip(root / "image_encoder" if layout == "diffusers" else root / CLIP_PTH,
                     dtype=torch.float16 if device.type == "cuda" else torch.float32, device=device, cfg=clip_cfg)
    return text, vae, clip, load_animate(root, dtype=dtype, device=device)


def animate_settings(preset, *, clip_len=None, refert_num=None, steps=None, shift=None, sampler=None,
                     guidance=None, clip_preprocess=None) -> AnimateSettings:
    """A shot's AnimateSettings: each value given, else the preset's (the CLI and the farm build them here)."""
    extra = preset.extra
    if isinstance(guidance, (list, tuple)):
        guidance = guidance[0]
    return AnimateSettings(
        clip_len=int(clip_len or extra.get("clip_len", 77)), refert_num=int(refert_num or extra.get("refert_num", 1)),
        steps=int(steps if steps is not None else preset.steps),
        shift=float(shift if shift is not None else preset.shift), sampler=sampler or "unipc",
        guidance=float(guidance if isinstance(guidance, (int, float)) else preset.guidance[0]),
        clip_preprocess=clip_preprocess or "official")


@dataclass
class AnimateStack:
    """The loaded models of an Animate render (one process, or one rank of a render group): loaded once, then
    shot after shot is rendered with `render_video`. `loras` are the (path, scale) applied, in `lora_mode`."""

    text: object
    vae: object
    clip: object
    model: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    group: object = None
    loras: tuple = ()
    lora_mode: str = "unmerged"
    load_seconds: float = 0.0
    tier_loras: tuple = ()  # the quality tier's distilled LoRA(s) (a draft), applied in tier_mode
    tier_mode: str = "merged"

    @property
    def is_main(self) -> bool:
        return self.group is None or self.group.is_main


def load_stack(preset, options, group=None, loras=(), lora_mode: str = "unmerged", tier_loras=(),
               tier_lora_mode: str = "merged") -> AnimateStack:
    """Text encoder, VAE, CLIP and the DiT (+ LoRAs, before parallelising: FSDP shards whatever weights it gets),
    with the pipeline's kernel settings. tier_loras: the quality tier's distilled LoRA(s) (a draft's 4-step LoRA),
    applied first in tier_lora_mode (merged: no cost per forward); loras: the shot's own, in lora_mode.
    Raises CheckpointError / CLIPCheckpointError / LoraError."""
    from renderer.lora import apply_loras, load_lora

    device = group.device if group is not None else options.torch_device()
    dtype = options.torch_dtype() if group is None or device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    t5_device = torch.device("cpu") if options.t5_cpu else device
    text_enc, vae, clip, model = _components(preset, preset.checkpoint, device, dtype, options.random_weights,
                                             t5_device)
    for path, scale in tier_loras:
        apply_loras(model, [(load_lora(path), scale)], mode=tier_lora_mode)
    for path, scale in loras:
        apply_loras(model, [(load_lora(path), scale)], mode=lora_mode)
    model.use_kernels(options.kernels)  # the pipeline's attention backend / fused ops / compile, no globals
    if group is not None and group.distributed:
        model = group.parallelize_experts([model])[0]
    return AnimateStack(text_enc, vae, clip, model, device, dtype, group, tuple(loras), lora_mode,
                        time.perf_counter() - t0, tuple(tier_loras), tier_lora_mode)


def render_video(stack: AnimateStack, inp: AnimateInputs, prompt: str, negative: str, settings: AnimateSettings,
                 seed: int, *, name: str = "shot", progress: bool = True, on_step=None,
                 on_clip=None) -> tuple[torch.Tensor, dict[str, float], int]:
    """One shot on a loaded stack: (video [3, F, H, W] in [-1, 1], seconds per stage, clips rendered).
    on_step(step, total steps of the shot); on_clip(k, n) after clip k of n."""
    from tqdm.auto import tqdm

    from renderer.families.animate.conditioning import clip_starts, padded_length, render_animate

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    with torch.no_grad():
        both = stack.text.encode([prompt, negative]).to(stack.device, stack.dtype)  # [2, 512, text_dim]
    timings["text_encode"] = time.perf_counter() - t0
    n_clips = len(clip_starts(padded_length(inp.pose.shape[1], settings.clip_len, settings.refert_num),
                              settings.clip_len, settings.refert_num))
    total = n_clips * settings.steps
    bar = tqdm(total=total, desc=f"{name} denoise ({n_clips} clips)", unit="step",
               disable=not (stack.is_main and progress), leave=False)
    done = [0]

    def step(i, t, e):
        done[0] += 1
        bar.update(1)
        if on_step is not None:
            on_step(done[0], total)

    clips_done = []
    t0 = time.perf_counter()
    video = render_animate(stack.model, stack.vae, stack.clip, inp, both[:1], both[1:], settings,
                           torch.Generator().manual_seed(int(seed)), group=stack.group, timings=timings,
                           on_step=step, on_clip=lambda k, n: (clips_done.append(k), on_clip and on_clip(k, n)))
    bar.close()
    timings["render"] = time.perf_counter() - t0
    return video, timings, len(clips_done)


def generate_animate(cfg, preset, options, group_factory=None) -> int:
    """The whole `generate` command for the Animate family. Returns the exit code. group_factory: makes the render
    group under torchrun (called only once every input has passed its checks)."""
    from omegaconf import OmegaConf

    from renderer.lora import LoraError
    from renderer.output import code_version
    from renderer.video_io import to_uint8_frames, write_json_atomic, write_mp4

    name = cfg.name or "shot"
    quality = cfg.get("quality")
    tier, tier_loras, problems = animate_tier(OmegaConf.to_container(quality, resolve=True) if quality else None,
                                              random_weights=preset.checkpoint is None)
    # a tier fixes the sampling fields it names (a draft: 4 Euler steps on the distilled schedule, guidance 1)
    fixed = {f: getattr(tier, f) for f in ("steps", "sampler", "shift", "guidance") if tier and getattr(tier, f)
             is not None}
    settings = animate_settings(preset, clip_len=cfg.get("clip_len"), refert_num=cfg.get("refert_num"),
                                steps=fixed.get("steps", cfg.steps), shift=fixed.get("shift", cfg.shift),
                                sampler=fixed.get("sampler", cfg.sampler), guidance=fixed.get("guidance", cfg.guidance),
                                clip_preprocess=cfg.get("clip_preprocess"))
    inp, more = read_inputs(cfg, preset.dit.motion_size)
    problems += more
    if inp is not None:
        problems += check_inputs(inp, settings, face_size=preset.dit.motion_size)
    if settings.steps < 1:
        problems.append(("steps", f"{settings.steps}: give at least 1"))
    try:
        loras = parse_loras(cfg.get("loras"), preset.checkpoint)
        lora_mode = cfg.get("lora_mode") or "unmerged"  # the official path keeps the relighting LoRA unmerged
        if lora_mode not in ("merged", "unmerged"):
            problems.append(("lora_mode", f"{lora_mode!r}: use merged or unmerged"))
        problems += [("loras", f"{p} does not exist") for p, _ in loras if not Path(p).is_file()]
    except ValueError as e:
        loras, problems = [], problems + [("loras", str(e))]
    if preset.checkpoint is None and not preset.is_tiny and not options.random_weights:
        problems.append(("model.checkpoint", f"model {preset.name} needs model.checkpoint=<Wan2.2-Animate-14B folder>"))
    elif preset.checkpoint is not None:
        from renderer.families.animate.checkpoint import check_animate_folder

        problems += [("model.checkpoint", p) for p in check_animate_folder(preset.checkpoint)]
    if problems:
        for field, msg in problems:
            print(f"error: shot {name}: {field}: {msg}", file=sys.stderr)
        return 2

    from renderer.checkpoint import CheckpointError
    from renderer.encoders.clip import CLIPCheckpointError

    try:
        group = group_factory() if group_factory else None  # torchrun: the render group (None: one process)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        stack = load_stack(preset, options, group, loras, lora_mode, tier_loras=tier_loras,
                           tier_lora_mode=tier.lora_mode)
    except (CheckpointError, CLIPCheckpointError, LoraError) as e:
        print(f"error: shot {name}: {'loras' if isinstance(e, LoraError) else 'model.checkpoint'}: {e}",
              file=sys.stderr)
        return 2
    device, dtype, main_rank = stack.device, stack.dtype, stack.is_main
    timings = {"model_load": stack.load_seconds}

    from renderer.families.wan22.prompts import DEFAULT_NEGATIVE_PROMPT  # Animate's config takes wan_shared_cfg's

    prompt = cfg.prompt or OFFICIAL_PROMPT
    negative = cfg.negative_prompt if cfg.negative_prompt is not None else DEFAULT_NEGATIVE_PROMPT
    if main_rank:
        print(f"wanrender: {preset.name} {inp.mode} on {device}, {inp.pose.shape[1]} frames "
              f"{inp.pose.shape[3]}×{inp.pose.shape[2]}, clips of {settings.clip_len} (refert {settings.refert_num}), "
              f"{settings.steps} steps, seed {cfg.seed}")
    video, stage_s, n_clips = render_video(
        stack, inp, prompt, negative, settings, int(cfg.seed), name=name, progress=options.progress,
        on_clip=lambda k, n: main_rank and print(f"  clip {k}/{n} done", flush=True))
    timings.update(stage_s)
    if group is not None:
        group.close()
    if not main_rank:  # every rank denoised; rank 0 writes
        return 0
    frames = to_uint8_frames(video[None])  # [F, H, W, 3] uint8

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = tier.output_stem(name)  # a draft is <name>.draft.mp4: it never replaces the final
    mp4 = out / f"{stem}.mp4"
    t0 = time.perf_counter()
    write_mp4(frames, mp4, fps=preset.fps, metadata={"comment": prompt, "seed": str(cfg.seed),
                                                      "description": f"AI-generated with wanrender {code_version()} "
                                                                     f"({preset.name}, {inp.mode})"},
              label="AI-generated" if cfg.label else None)
    timings["mp4_write"] = time.perf_counter() - t0
    side = {
        "shot": name, "model": preset.name, "family": "animate", "mode": inp.mode, "task": "animate",
        "prompt": prompt, "negative_prompt": negative, "seed": int(cfg.seed), "steps": settings.steps,
        "sampler": settings.sampler, "shift": settings.shift, "guidance": settings.guidance,
        "clip_len": settings.clip_len, "refert_num": settings.refert_num, "clips": n_clips,
        "clip_preprocess": settings.clip_preprocess, "frames": int(frames.shape[0]),
        "size": f"{frames.shape[2]}*{frames.shape[1]}", "fps": preset.fps,
        "loras": [{"path": p, "scale": s, "mode": lora_mode} for p, s in loras],
        "quality": tier.describe(), "final": tier.is_final,
        "inputs": {k: cfg.get(k) for k in ("image", "pose_video", "face_video", "background_video", "mask_video")},
        "checkpoint": preset.checkpoint, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "code_version": code_version(), "timings_s": {k: round(v, 4) for k, v in timings.items()},
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    write_json_atomic(out / f"{stem}.json", side)
    print(f"wrote {mp4} and {stem}.json: {n_clips} clips, render {timings['render']:.1f}s, quality {tier.name}")
    return 0


__all__ = ["AnimateStack", "animate_settings", "animate_tier", "generate_animate", "letterbox", "load_stack",
           "parse_loras", "read_inputs", "render_video"]
