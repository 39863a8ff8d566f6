"""One shot from prompt (and image) to frames: text encoder -> conditioner -> denoising loop -> VAE decode.

    shot (ShotSpec) --check--> text encoding --> latent noise (CPU generator: same video on any device)
        --> the family's conditioner for the task (renderer/families/<family>/conditioners.py)
        --> renderer/denoise.py (A14B: high-noise expert while t >= boundary·1000, then the low-noise expert;
            the guider runs cond/uncond with each expert's own scale)
        --> VAE decode --> uint8 frames + everything needed to re-render the shot

The pipeline holds the models of one preset and renders shot after shot without reloading them (the render
farm keeps one Pipeline per render group). Writing files is renderer/output.py's job.
"""
from __future__ import annotations

import logging
import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from renderer import checkpoint as ckpt
from kernels.settings import KernelSettings
from renderer.denoise import denoise
from renderer.families import get_family
from renderer.families.spec import ShotInputs
from renderer.guidance import make_guider
from renderer.presets import ModelPreset, auto_size_of, check_shot, default_task, parse_size
from renderer.sampling import make_sampler
from renderer.tiers import TierSettings, prepare_experts

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
NOISE_DEVICES = ("cpu", "device")


class ShotError(ValueError):
    """A shot that cannot be rendered as asked; raised before any compute."""


@dataclass(frozen=True)
class ShotSpec:
    """What one render needs. Unset fields take the model preset's defaults (see `resolve`)."""

    prompt: str
    task: str | None = None
    negative_prompt: str | None = None
    image: str | None = None
    size: str | None = None
    frames: int | None = None
    steps: int | None = None
    seed: int = 0
    guidance: tuple[float, float] | float | None = None  # (low-noise, high-noise) or one scale for both
    sampler: str = "unipc"
    shift: float | None = None
    shot_id: str = "shot"
    random_seed: bool = False  # seed -1 was asked for: `seed` holds the one drawn (the hash keeps -1)

    def resolve(self, preset: ModelPreset) -> "ShotSpec":
        """Every unset field from the preset and the family, as the official generate() does: an empty negative
        prompt is the family's default, seed -1 draws a random seed (once: a resolved shot keeps it), size auto
        (the default for image tasks given an image) comes from the image's aspect ratio. Idempotent."""
        family = get_family(preset.family)
        g = self.guidance if self.guidance is not None else preset.guidance
        g = (float(g), float(g)) if isinstance(g, (int, float)) else (float(g[0]), float(g[1]))
        task = self.task or default_task(preset, self.image)

        def given(v, default):  # 0 is a value to check, not "unset"
            return default if v is None else v

        negative = self.negative_prompt
        if negative is None or not str(negative).strip():
            negative = family.default_negative_prompt
        seed, random_seed = self.seed, self.random_seed
        if seed == -1 and isinstance(seed, int) and not isinstance(seed, bool):
            seed, random_seed = random.SystemRandom().randint(0, sys.maxsize), True  # the official range
        size = self.size
        if size is None:
            size = "auto" if task in family.accepts_image and self.image else preset.size
        if str(size) == "auto":
            size = auto_size_of(preset, task, self.image) or "auto"  # unreadable image: check_shot says so
        return replace(self, task=task, negative_prompt=negative, seed=seed, random_seed=random_seed,
                       size=str(size), frames=given(self.frames, preset.frames),
                       steps=given(self.steps, preset.steps), guidance=g,
                       shift=float(self.shift if self.shift is not None else preset.shift))

    def hash_seed(self):
        """The seed as asked for: -1 for a random one (so a resubmitted job finds the shot done)."""
        return -1 if self.random_seed else self.seed


@dataclass
class RenderOptions:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # attention backend, fused ops, compile, precision (auto: bf16 on GPU, fp32 on CPU), step cache
    kernels: KernelSettings = field(default_factory=KernelSettings)
    # auto | resident (all experts on the device) | offload (idle expert in CPU memory) |
    # stream (blocks in CPU memory, streamed to the device one block ahead: cards smaller than one expert)
    placement: str = "auto"
    t5_cpu: bool = False  # keep the text encoder in CPU memory (saves ~11 GB of GPU memory for UMT5-XXL)
    vae_tile: bool | None = None  # None: tile the VAE decode when the frame is large
    random_weights: bool = False  # full-size models with random weights (benchmarks: speed ignores the values)
    progress: bool = True
    # cpu: noise from a CPU generator (the same video from a seed on any machine); device: a torch.Generator on
    # the render device, as the official code draws it (to compare with official renders)
    noise_device: str = "cpu"

    def __post_init__(self) -> None:
        if self.noise_device not in NOISE_DEVICES:
            raise ValueError(f"render.noise_device={self.noise_device!r}: use cpu (the same noise on any machine) "
                             f"or device (drawn on the render GPU, as the official code)")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self) -> torch.dtype:
        precision = self.kernels.precision
        if precision == "auto":
            return torch.bfloat16 if self.torch_device().type == "cuda" else torch.float32
        return DTYPES[precision]

    @classmethod
    def from_dict(cls, d: dict) -> "RenderOptions":
        """From `asdict(options)` (what the farm ships to its actors)."""
        d = dict(d)
        d["kernels"] = KernelSettings.from_dict(d.get("kernels"))
        return cls(**d)


@dataclass
class RenderResult:
    frames: "object"  # numpy uint8 [F, H, W, 3]
    shot: ShotSpec
    timings: dict[str, float] = field(default_factory=dict)
    step_seconds: list[float] = field(default_factory=list)
    experts_used: list[int] = field(default_factory=list)
    latent: torch.Tensor | None = None


def _load_components(preset: ModelPreset, checkpoint: str | None, device: torch.device, dtype: torch.dtype,
                     t5_device: torch.device, expert_device: torch.device, random_weights: bool = False,
                     need_text: bool = True):
    """Text encoder, VAE and experts: from a checkpoint folder, or random weights drawn from the preset's seed.

    need_text=False (every rank of a group but rank 0, which encodes and broadcasts) skips the text encoder:
    UMT5-XXL is 11 GB that the other GPUs need for activations."""
    from renderer.encoders.text import build_random_umt5_xxl, build_tiny_text_encoder, load_text_encoder
    from renderer.vae import build_vae, load_vae

    if checkpoint is None:
        if not preset.is_tiny and not random_weights:
            raise ShotError(f"model {preset.name} needs model.checkpoint=<Wan2.2 folder> (random full-size weights, "
                            f"render.random_weights=true, are for benchmarks only: speed does not depend on them)")
        text = None
        if need_text and preset.is_tiny:
            text = build_tiny_text_encoder(seed=preset.seed_weights, d_model=preset.dit.text_dim)
        elif need_text:
            text = build_random_umt5_xxl(t5_device, dtype, seed=preset.seed_weights)
        if text is not None:
            text = _move_text_encoder(text, t5_device, dtype)
        vae_dtype = torch.float32 if preset.is_tiny or device.type != "cuda" else dtype
        vae = build_vae(preset.vae.version, tiny=preset.vae.tiny, dtype=vae_dtype, device=device,
                        seed=preset.seed_weights)
        build = get_family(preset.family).build_model
        experts = [build(preset.dit, dtype=dtype, device=expert_device, seed=preset.seed_weights + i)
                   for i in range(len(preset.experts))]
        return text, vae, experts
    root = Path(checkpoint)
    text = load_text_encoder(root, device=t5_device, dtype=dtype) if need_text else None
    layout, _ = ckpt.expert_folders(root, preset.experts)
    vae_path = root / "vae" if layout == "diffusers" else root / f"Wan{preset.vae.version}_VAE.pth"
    vae = load_vae(vae_path, version=preset.vae.version, dtype=dtype, device=device)
    experts = ckpt.load_experts(root, preset.experts, dtype=dtype, device=expert_device, family=preset.family)
    return text, vae, experts


def _move_text_encoder(text, device: torch.device, dtype: torch.dtype):
    text.model.to(device=device, dtype=dtype if device.type == "cuda" else torch.float32)
    text.device = device
    return text


class Pipeline:
    def __init__(self, preset: ModelPreset, checkpoint: str | None = None, options: RenderOptions | None = None,
                 components=None, group=None, tier: TierSettings | None = None):
        """group: a renderer.parallel RenderGroup when the shot is rendered by several GPUs (None: one device);
        tier: the quality tier (renderer/tiers.py; None = exact) — its LoRAs, FP8 and step cache are applied here,
        its attention backend and lossy permission go into the kernel settings."""
        self.preset = preset
        self.family = get_family(preset.family)
        self.tier = tier or TierSettings()
        self.options = self.tier.with_kernels(options or RenderOptions())
        self.device = self.options.torch_device()
        self.dtype = self.options.torch_dtype()
        self.checkpoint = checkpoint
        self.fingerprint = ckpt.fingerprint(checkpoint) if checkpoint else f"random-seed{preset.seed_weights}"
        t5_device = torch.device("cpu") if self.options.t5_cpu else self.device
        self.group = group
        self.is_main = group is None or group.is_main
        self.placement = self._choose_placement()
        if self.tier.linear == "fp8" and self.placement == "stream":  # streaming moves parameters, not FP8 buffers
            raise ValueError(f"quality {self.tier.name} (quality.linear=fp8) cannot run with placement=stream: use "
                             f"placement=offload or resident, or quality.linear=bf16")
        expert_device = self.device if self.placement == "resident" else torch.device("cpu")
        t0 = time.perf_counter()
        if components is None:
            components = _load_components(preset, checkpoint, self.device, self.dtype, t5_device, expert_device,
                                          self.options.random_weights, need_text=self.is_main)
        self.text_encoder, self.vae, self.experts = components
        self.kernels = self.options.kernels
        self.experts = [m.use_kernels(self.kernels) for m in self.experts]  # before streaming / parallelizing
        random_weights = checkpoint is None
        self.experts = prepare_experts(list(self.experts), self.tier, random_weights, "weights")
        if self.placement == "stream":
            from renderer.offload import stream_blocks

            self.experts = [stream_blocks(m, self.device) for m in self.experts]
        if group is not None and group.distributed:
            self.experts = group.parallelize_experts(self.experts)
        self.step_caches = prepare_experts(self.experts, self.tier, random_weights, "runtime")
        self.load_seconds = time.perf_counter() - t0
        self._on_device: int | None = None if self.placement == "offload" else -1

    # -- memory placement -------------------------------------------------------------------------------------
    def _choose_placement(self) -> str:
        """Both experts resident when they fit in free device memory, else one at a time (the idle one on CPU)."""
        choice = self.options.placement
        if choice not in ("auto", "resident", "offload", "stream"):
            raise ValueError(f"placement {choice!r}: use auto, resident, offload or stream")
        in_group = self.group is not None and self.group.distributed
        if in_group and choice in ("offload", "stream"):
            # checked before anything loads: the group shards with FSDP instead of moving weights to the host
            raise ValueError(f"placement={choice} cannot be combined with a multi-GPU render group: use "
                             f"placement=resident or auto (parallel.fsdp shards the experts when they do not fit)")
        if choice != "auto":
            return choice
        if self.device.type != "cuda" or in_group:
            return "resident"
        c = self.preset.dit
        params_per_expert = c.num_layers * (4 * 2 * c.dim * c.dim + 2 * c.dim * c.ffn_dim) + 8 * c.dim * c.dim
        one = params_per_expert * self.dtype.itemsize
        free, _ = torch.cuda.mem_get_info(self.device)
        # keep ~40% of free memory for activations, the VAE and the text encoder
        if len(self.preset.experts) * one < 0.6 * free:
            return "resident"
        return "offload" if one < 0.6 * free else "stream"

    def _expert(self, index: int) -> torch.nn.Module:
        if self.placement == "offload" and self._on_device != index:
            for j, m in enumerate(self.experts):
                if j != index:
                    m.to("cpu")
            self.experts[index].to(self.device)
            self._on_device = index
        return self.experts[index]

    # -- checks -------------------------------------------------------------------------------------------------
    def check(self, shot: ShotSpec) -> list[tuple[str, str]]:
        s = self.tier.apply(shot).resolve(self.preset)
        return check_shot(self.preset, s.task, s.size, s.frames, s.steps, s.prompt, s.image, s.sampler, seed=s.seed,
                          guidance=s.guidance, shift=s.shift)  # a NaN scale renders grey: refused as ShotError

    def latent_shape(self, shot: ShotSpec) -> tuple[int, int, int, int]:
        w, h = parse_size(shot.size)
        st, sh, sw = self.preset.vae.stride
        return self.preset.vae.z_dim, (shot.frames - 1) // st + 1, h // sh, w // sw

    # -- conditioning -------------------------------------------------------------------------------------------
    def encode_text(self, shot: ShotSpec) -> tuple[torch.Tensor, torch.Tensor]:
        negative = shot.negative_prompt  # resolved: the family's default when none was given
        distributed = self.group is not None and self.group.distributed
        if self.is_main:
            with torch.no_grad():
                both = self.text_encoder.encode([shot.prompt, negative])  # [2, 512, text_dim]
            both = both.to(self.device, self.dtype)
        else:
            both = torch.empty(2, self.preset.dit.text_len, self.preset.dit.text_dim, device=self.device,
                               dtype=self.dtype)
        if distributed:  # encoded once per group, on rank 0
            import torch.distributed as dist

            dist.broadcast(both, src=0)
        return both[:1], both[1:]

    # -- the render ---------------------------------------------------------------------------------------------
    def render(self, shot: ShotSpec, on_step: Callable[[int, int], None] | None = None,
               keep_latent: bool = False, initial_noise: torch.Tensor | None = None) -> RenderResult:
        shot = self.tier.apply(shot).resolve(self.preset)  # the tier's steps / sampler / shift / guidance
        for cache in self.step_caches:
            cache.reset()
        from renderer.cache import plan_for_shot

        self.cache_plan = plan_for_shot(self.step_caches, self.preset.name, shot.steps, shot.shift,
                                        self.preset.boundary, image=shot.image is not None)
        problems = self.check(shot)
        if problems:
            raise ShotError("; ".join(f"shot {shot.shot_id}: {f}: {m}" for f, m in problems))
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        context, context_null = self.encode_text(shot)
        timings["text_encode"] = time.perf_counter() - t0

        shape = self.latent_shape(shot)
        if initial_noise is None:
            initial_noise = self.initial_noise(shape, shot.seed)  # [1, z, F', h, w]
        t0 = time.perf_counter()
        conditioner = self.family.conditioners[shot.task](ShotInputs(
            task=shot.task, context=context, context_null=context_null, latent_shape=shape,
            size=parse_size(shot.size), frames=shot.frames, image=shot.image, vae=self.vae, device=self.device,
            model_config=self.preset.dit, shot=shot))
        timings["image_encode"] = time.perf_counter() - t0

        sampler = make_sampler(shot.sampler, shot.steps, shot.shift)
        step_seconds, experts_used = [], []
        bar = _progress(shot, self.options.progress and self.is_main)
        last = [time.perf_counter()]

        def after_each_step(i: int, t: float, expert: int) -> None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # honest per-step times
            now = time.perf_counter()
            step_seconds.append(now - last[0])
            last[0] = now
            experts_used.append(expert)
            bar.update(1)
            if on_step:
                on_step(i + 1, shot.steps)

        t_loop = time.perf_counter()
        latent = denoise(_ExpertView(self), conditioner, sampler, initial_noise.to(self.device),
                         guider=make_guider(self.group), boundary=self.preset.boundary, guidances=shot.guidance,
                         group=self.group, callback=after_each_step)
        bar.close()
        timings["denoise"] = time.perf_counter() - t_loop
        t0 = time.perf_counter()
        with torch.no_grad():
            vae_dtype = next(self.vae.parameters()).dtype
            if self._decode_in_parallel(latent):
                from renderer.vae.parallel_decode import decode_distributed

                # every rank decodes one band of every frame (halo exchange: equal to one untiled decode);
                # rank 0 gets [1, 3, F, H, W], the others None
                video = decode_distributed(self.vae, latent.to(vae_dtype), self.group)
            elif self.is_main:
                video = self.vae.decode(latent.to(vae_dtype), tile=self.options.vae_tile)  # [1, 3, F, H, W]
            else:
                video = None
        if video is None:  # not rank 0: rank 0 writes the outputs, nothing more to do for this shot
            return RenderResult(frames=None, shot=shot, timings=timings, step_seconds=step_seconds,
                                experts_used=experts_used, latent=latent.cpu() if keep_latent else None)
        from renderer.video_io import to_uint8_frames

        frames = to_uint8_frames(video)  # converted on the device, then copied
        timings["vae_decode"] = time.perf_counter() - t0
        return RenderResult(frames=frames, shot=shot, timings=timings, step_seconds=step_seconds,
                            experts_used=experts_used, latent=latent.cpu() if keep_latent else None)

    def initial_noise(self, shape: tuple[int, ...], seed: int) -> torch.Tensor:
        """[1, *shape] fp32 standard normal from `seed`: on a CPU generator (any machine gives the same video), or
        with render.noise_device=device as the official code (torch.Generator on the render device, one randn of
        the latent shape without the batch dim)."""
        if self.options.noise_device == "device":
            gen = torch.Generator(device=self.device).manual_seed(int(seed))
            return torch.randn(tuple(shape), dtype=torch.float32, device=self.device, generator=gen)[None]
        gen = torch.Generator("cpu").manual_seed(int(seed))
        return torch.randn((1, *shape), generator=gen, dtype=torch.float32)  # [1, z, F', h, w]

    def _decode_in_parallel(self, latent: torch.Tensor) -> bool:
        """Split the VAE decode over the group's ranks: each rank decodes a band of every frame, exchanging one
        border line per convolution, so the frames equal one process decoding untiled (renderer/vae/
        parallel_decode.py) at 1/world of the work and activation memory per rank. render.vae_tile=false keeps the
        whole decode on rank 0."""
        return self.group is not None and self.group.distributed and self.options.vae_tile is not False

    def describe(self) -> dict:
        """What ran where: for logs and sidecars."""
        return {"model": self.preset.name, "checkpoint": self.checkpoint, "fingerprint": self.fingerprint,
                "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "placement": self.placement, "options": asdict(self.options), "tier": self.tier.describe(),
                **self.cache_report()}

    def cache_report(self) -> dict:
        """The step cache of the last render: computed / cached calls per expert and what decided (the plan)."""
        return {"step_cache": [{"computed": c.stats.computed, "cached": c.stats.cached} for c in self.step_caches],
                "step_cache_plan": getattr(self, "cache_plan", None)}


class _ExpertView:
    """experts[i] for the denoising loop, moving expert i onto the GPU first when the idle one is offloaded."""

    def __init__(self, pipe: Pipeline):
        self.pipe = pipe

    def __len__(self) -> int:
        return len(self.pipe.experts)

    def __getitem__(self, i: int):
        return self.pipe._expert(i)


def _progress(shot: ShotSpec, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=shot.steps, desc=f"{shot.shot_id} denoise", unit="step", disable=not enabled, leave=False)
