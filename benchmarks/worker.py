"""One benchmark row: every rank of a render group runs this; rank 0 writes what was measured as JSON.

    torchrun --standalone --nproc-per-node N -m benchmarks.worker --spec row.json

benchmarks.scaling writes the spec (model preset dict, shot, render options, parallel layout, timed steps) and
launches this; it also runs by hand. Imports neither Ray, Hydra nor OmegaConf: the GPU machines have torch,
triton, transformers (hence PyYAML, safetensors, tqdm) and numpy, nothing else.

Order of work on each rank: group (renderer.parallel.init_group, WORLD_SIZE > 1 only) -> Pipeline built once
(random weights unless the preset names a checkpoint) -> warm-up (text encoding + one expert forward: compile,
attention autotuning and cuBLAS set-up happen there, not in the timed steps) -> one render, every stage timed
by the Pipeline -> MP4 write on rank 0 when ffmpeg is there -> per-rank peak memory gathered to rank 0.

Timed steps: with timed_steps=K < the schedule's N steps the render runs K steps *of the real N-step schedule*
(the first ceil(K/2) and the last floor(K/2) timesteps), so an A14B run times both experts; the denoise figure
for the whole shot is then median step × N, and the JSON says "scaled from K of N steps". Those K steps are
stepped with Euler (a multistep sampler such as UniPC cannot skip steps): the row's `sampler` is the shot's,
`sampler_ran` what the render really stepped with (recorded from the sampler it built, not assumed). With K = N
the shot's own sampler runs. Every row carries the code version and provenance (renderer/provenance.py).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from renderer.parallel.config import ParallelConfig
from renderer.denoise import select_expert
from renderer.provenance import code_version, provenance
from renderer.sampling import FlowEuler, build_schedule

STEP_SLEEP_KEY = "inject_step_sleep_s"  # test hook (nightly regression tests): seconds slept after every step


def subset_indices(full_steps: int, k: int) -> list[int]:
    """Indices of the timed steps: the first ceil(k/2) and the last floor(k/2) of the full schedule."""
    if k >= full_steps:
        return list(range(full_steps))
    first, last = math.ceil(k / 2), k // 2
    return list(range(first)) + list(range(full_steps - last, full_steps))


class SubsetSchedule(FlowEuler):
    """K timesteps picked out of the real N-step schedule, stepped with Euler between them.

    The latent values are meaningless (so are random weights'); what matters is that the model sees the same
    shapes and the same timesteps — hence the same expert — as in those steps of the full render. The sampler
    arithmetic is a few elementwise ops either way, nothing next to a DiT forward.
    """

    def __init__(self, full_steps: int, shift: float, indices: list[int], grid: str = "unipc"):
        sigmas, timesteps = build_schedule(full_steps, shift, grid)
        self.indices = list(indices)
        self.steps, self.shift = len(self.indices), float(shift)
        self.timesteps = timesteps[self.indices]  # [K]
        self.sigmas = torch.cat([sigmas[self.indices], torch.zeros(1)])  # [K+1], ends at 0 like a real schedule
        self._sig = [float(s) for s in self.sigmas]
        self.reset()


def expected_experts(preset, full_steps: int, shift: float, indices: list[int], guidance,
                     sampler: str = "unipc") -> list[int]:
    from renderer.sampling import make_sampler

    ts = make_sampler(sampler, full_steps, shift).timesteps  # the sampler's own grid (euler_lightning: its own)
    return [select_expert(float(ts[i]), preset.boundary, len(preset.experts), guidance)[0] for i in indices]


def mp4_available() -> str | None:
    """None when an MP4 can be written here, else why not (the GPU machines ship without ffmpeg-python)."""
    if importlib.util.find_spec("ffmpeg") is None:
        return "ffmpeg-python is not installed"
    try:
        from renderer.video_io import ffmpeg_exe

        ffmpeg_exe()
    except Exception as e:  # no binary on PATH and no imageio-ffmpeg
        return str(e)
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def step_stats(seconds: list[float]) -> dict:
    if not seconds:
        return {"n": 0}
    med = statistics.median(seconds)
    return {"n": len(seconds), "median_s": med, "min_s": min(seconds), "max_s": max(seconds),
            "spread": (max(seconds) - min(seconds)) / med if med > 0 else None, "all_s": seconds}


def model_flops(preset, size: str, frames: int) -> dict:
    """FLOPs of one DiT forward at this shot's size (benchmarks.profile_step.count_flops: 4·L²·D self-attention
    per block, 2·L·params for the linears, cross-attention over the 512 text tokens)."""
    from benchmarks.profile_step import count_flops
    from renderer.presets import parse_size

    w, h = parse_size(size)
    st, sh, sw = preset.vae.stride
    pt, ph, pw = preset.dit.patch_size
    f_lat, h_lat, w_lat = (frames - 1) // st + 1, h // sh, w // sw
    tokens = (f_lat // pt) * (h_lat // ph) * (w_lat // pw)
    return {"tokens": tokens, "per_forward": count_flops(preset.dit, 1, tokens, preset.dit.num_layers)}


def build_group(parallel: dict | None, world: int, num_heads: int, two_passes: bool = True):
    """The render group for WORLD_SIZE > 1 (the same code the CLI's group_from and the farm run), else None.
    two_passes: the shot's guider runs cond and uncond each step; without, a cfg=2 layout is folded
    (renderer.parallel.effective_layout, unless the spec's parallel says fold_idle_cfg: false)."""
    if world == 1:
        return None
    from renderer.parallel import effective_layout, init_group

    pcfg = ParallelConfig.from_dict(parallel or {"ulysses": world})
    pcfg.validate(world, num_heads)  # the exact message before any rendezvous
    group = init_group(effective_layout(pcfg, two_passes, num_heads))
    group.configured = pcfg
    return group


def gather(group, value):
    if group is None or not group.distributed:
        return [value]
    import torch.distributed as dist

    out = [None] * group.world_size
    dist.all_gather_object(out, value)
    return out


def run(spec: dict) -> dict | None:
    from kernels.attention import resolved_backend
    from kernels.settings import KernelSettings
    from renderer.pipeline import Pipeline, RenderOptions, ShotSpec
    from renderer.presets import ModelPreset

    import renderer.pipeline as pipeline_mod

    t_start = time.perf_counter()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    preset = ModelPreset.from_dict(spec["model"])
    r = spec["render"]
    from renderer.parallel import cfg_active
    from renderer.tiers import load_tier

    tier = load_tier(spec.get("quality") or "exact", spec.get("quality_overrides") if spec.get("quality") not in
                     (None, "exact") else None)
    s = spec["shot"]
    g = next(v for v in (tier.guidance, s.get("guidance"), preset.guidance) if v is not None)
    group = build_group(spec.get("parallel"), world, preset.dit.num_heads, cfg_active(g))
    kernels = KernelSettings.from_dict({"attention": r.get("attention", "auto"), "precision": r.get("dtype", "auto"),
                                        "compile": r.get("compile", "auto")})
    options = RenderOptions(device=str(group.device) if group else r.get("device", "auto"),
                            kernels=kernels, placement=r.get("placement", "auto"),
                            t5_cpu=bool(r.get("t5_cpu", False)), vae_tile=r.get("vae_tile"),
                            random_weights=bool(r.get("random_weights", True)), progress=False)
    device = options.torch_device()
    if r.get("cpu_threads"):
        torch.set_num_threads(int(r["cpu_threads"]))
    full = ShotSpec(prompt=s.get("prompt") or "a red kite over a beach at dusk", task=s.get("task"),
                    size=s.get("size"), frames=s.get("frames"), steps=s.get("steps"), seed=int(s.get("seed", 0)),
                    sampler=s.get("sampler", "unipc"), guidance=s.get("guidance"), shot_id=spec.get("name", "bench"))
    full = tier.apply(full).resolve(preset)  # the tier's steps / sampler / shift / guidance
    full_steps = full.steps
    # a cached step is not a median step: fast and draft rows time every step of their schedule
    k = min(int(spec.get("timed_steps") or full_steps), full_steps) if tier.is_final else full_steps
    indices = subset_indices(full_steps, k)

    t0 = time.perf_counter()
    pipe = Pipeline(preset, checkpoint=preset.checkpoint, options=options, group=group, tier=tier)
    build_s = time.perf_counter() - t0

    shot = full
    grid = "dpm++" if full.sampler == "dpm++" else "unipc"
    if k < full_steps:  # K steps of the real schedule (see the module docstring)
        shot = replace(full, steps=k)
    samplers_ran: list[str] = []  # what the render really stepped with, for the row
    real_make_sampler = pipeline_mod.make_sampler

    def make_sampler(name, steps, shift):
        if k < full_steps:
            sampler = SubsetSchedule(full_steps, shift, indices, grid)
            samplers_ran.append(f"euler over {k} of the {full_steps} timesteps of the {grid} schedule "
                                f"(the shot's {name} needs every step)")
        else:
            sampler = real_make_sampler(name, steps, shift)
            samplers_ran.append(f"{name} ({type(sampler).__name__}, {steps} steps)")
        return sampler

    pipeline_mod.make_sampler = make_sampler

    warm = spec.get("warmup", "auto")
    warmup_s = None
    if warm is True or (warm == "auto" and device.type == "cuda"):
        warmup_s = _warm_up(pipe, full, device)

    sleep_s = float(spec.get(STEP_SLEEP_KEY) or 0.0)
    last = [time.perf_counter()]

    def on_step(i: int, n: int) -> None:
        # one line per step on the main rank: a row cut short by its timeout still shows how far it got and at
        # what pace (wall time between step ends; the row's step times come from the render's synchronised clock)
        if pipe.is_main:
            now = time.perf_counter()
            print(f"[worker] step {i}/{n} +{now - last[0]:.2f}s", file=sys.stderr, flush=True)
            last[0] = now
        if sleep_s > 0:
            time.sleep(sleep_s)
    if group is not None:
        group.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    last[0] = t0
    try:
        result = pipe.render(shot, on_step=on_step)
    finally:
        pipeline_mod.make_sampler = real_make_sampler
    render_s = time.perf_counter() - t0
    if len(samplers_ran) != 1:
        raise RuntimeError(f"the render built {len(samplers_ran)} samplers through renderer.pipeline.make_sampler, "
                           f"expected 1: the row could not say which sampler ran")
    meta_sampler = samplers_ran[0]

    want = expected_experts(preset, full_steps, full.shift, indices, full.guidance, full.sampler)
    if list(result.experts_used) != want or len(result.step_seconds) != k:
        raise RuntimeError(f"the render did not run the planned steps: experts {result.experts_used}, expected "
                           f"{want} ({len(result.step_seconds)} step times for {k} steps) — has Pipeline.render "
                           f"stopped calling renderer.pipeline.make_sampler?")

    mp4 = {"seconds": None, "skipped": None, "path": None}
    if pipe.is_main:
        mp4 = _write_mp4(pipe, result, spec)

    ranks = gather(group, _memory(device))
    meta = {"compiled": any(bool(getattr(getattr(m, "module", m), "_blocks_compiled", False)) for m in pipe.experts),
            "compile_s": {f"expert{i}:{key}": v for i, m in enumerate(pipe.experts)
                          for key, v in getattr(getattr(m, "module", m), "compile_seconds", {}).items()},
            "attention_backend": resolved_backend(kernels.attention), "sampler_ran": meta_sampler}
    if group is not None:
        group.barrier()
        group.close()
    if not pipe.is_main:
        return None
    return _row(spec, preset, pipe, full, result, k, indices, build_s, warmup_s, render_s, mp4, ranks, meta,
                device, world, time.perf_counter() - t_start)


def _warm_up(pipe, shot, device) -> float:
    """Text encoding and one forward of the first expert at the shot's size, untimed by the render: the first
    forward compiles (compile=auto on one GPU), autotunes attention and sets up cuBLAS."""
    t0 = time.perf_counter()
    with torch.no_grad():
        ctx, _ = pipe.encode_text(shot)
        shape = pipe.latent_shape(shot)
        x = torch.zeros((1, *shape), device=device)  # [1, C, F', h, w]
        t = torch.full((1,), 999.0, device=device)  # [1]
        pipe._expert(0)(x, t, ctx)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if pipe.group is not None:
        pipe.group.barrier()
    return time.perf_counter() - t0


def _write_mp4(pipe, result, spec) -> dict:
    want = spec.get("mp4", "auto")
    why = mp4_available() if want is not False else "mp4=false"
    if why is not None:
        if want is True:
            raise RuntimeError(f"mp4=true but no MP4 can be written here: {why}")
        return {"seconds": None, "skipped": why, "path": None}
    from renderer.output import write_shot

    out_dir = Path(spec.get("out_dir") or ".")
    mp4, _ = write_shot(pipe, result, out_dir, name=spec.get("name", "bench"))
    return {"seconds": result.timings["mp4_write"], "skipped": None, "path": str(mp4)}


def _memory(device: torch.device) -> dict:
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux
    gpu = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    reserved = torch.cuda.max_memory_reserved(device) / 1e9 if device.type == "cuda" else None
    return {"peak_gpu_allocated_gb": gpu, "peak_gpu_reserved_gb": reserved, "peak_rss_gb": rss_gb}


def _row(spec, preset, pipe, full, result, k, indices, build_s, warmup_s, render_s, mp4, ranks, meta, device,
         world, wall_s) -> dict:
    t = result.timings
    steps = step_stats(result.step_seconds)
    n = full.steps
    scaled = k < n
    label = f"scaled from {k} of {n} steps" if scaled else None
    denoise_full = steps["median_s"] * n if scaled else t["denoise"]
    total = t["text_encode"] + t.get("image_encode", 0.0) + denoise_full + t["vae_decode"] + (mp4["seconds"] or 0.0)
    fl = model_flops(preset, full.size, full.frames)
    forwards = 1 if (full.guidance[1] == 1.0 and full.guidance[0] == 1.0) else 2  # CFG: cond + uncond
    per_step = fl["per_forward"]["total"] * forwards
    tflops = per_step / steps["median_s"] / world / 1e12 if steps.get("median_s") else None
    return {
        "name": spec.get("name"), "layout": spec.get("layout"), "gpus": world,
        "quality": pipe.tier.name, "tier": pipe.tier.describe(), **pipe.cache_report(),
        "sampler": full.sampler, "guidance": list(full.guidance),
        "parallel": pipe.group.pcfg.describe() if pipe.group else "single process",
        "layout_from": spec.get("layout_from"),
        "model": preset.name, "checkpoint": preset.checkpoint, "random_weights": preset.checkpoint is None,
        "task": full.task, "size": full.size, "frames": full.frames, "steps": n, "timed_steps": k,
        "sampler": full.sampler, "sampler_ran": meta["sampler_ran"],
        "timed_step_indices": indices, "experts_used": result.experts_used, "scaled": label,
        "device": str(device), "device_name": device_name(device), "dtype": str(pipe.dtype).replace("torch.", ""),
        "placement": pipe.placement, "t5_cpu": pipe.options.t5_cpu, "torch": torch.__version__,
        "attention_backend": meta["attention_backend"], "compiled": meta["compiled"], "compile_s": meta["compile_s"],
        STEP_SLEEP_KEY: spec.get(STEP_SLEEP_KEY) or 0.0,
        "seconds": {"build": build_s, "warmup": warmup_s, "text_encode": t["text_encode"],
                    "image_encode": t.get("image_encode", 0.0), "denoise_timed": t["denoise"],
                    "denoise": denoise_full, "vae_decode": t["vae_decode"], "mp4_write": mp4["seconds"],
                    "total": total, "render_wall": render_s, "process_wall": wall_s},
        "total_note": "text + denoise + VAE decode + MP4 write; model build and warm-up excluded"
                      + (f"; denoise {label} (median step × {n})" if scaled else "")
                      + ("" if mp4["seconds"] is not None else f"; MP4 write not measured ({mp4['skipped']})"),
        "step": steps, "mp4_skipped": mp4["skipped"], "mp4_path": mp4["path"],
        "tokens": fl["tokens"], "flops_per_forward": fl["per_forward"], "forwards_per_step": forwards,
        "tflops_per_gpu": tflops, "ranks": ranks,
        "peak_gpu_allocated_gb_max": max((m["peak_gpu_allocated_gb"] or 0.0) for m in ranks) if device.type == "cuda"
        else None,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "code_version": code_version(), "provenance": provenance(),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.worker", description=__doc__.split("\n")[0])
    ap.add_argument("--spec", required=True, help="JSON spec written by benchmarks.scaling")
    ap.add_argument("--out", default=None, help="JSON result path (default: the spec's out_json)")
    args = ap.parse_args(argv)
    spec = json.loads(Path(args.spec).read_text())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    row = run(spec)
    if row is not None:
        out = Path(args.out or spec["out_json"])
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(row, indent=1, default=str))
        os.replace(tmp, out)  # the driver never reads half a file
    return 0


if __name__ == "__main__":
    sys.exit(main())
