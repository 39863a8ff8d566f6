"""Time one DiT forward (one denoising step of one CFG branch) and compare it with the hardware floor.

    python -m benchmarks.profile_step --model t2v_a14b --size 1280*720 --frames 81 --mode both --out out/step.json
    python -m benchmarks.profile_step --model tiny_t2v --size 64*48 --frames 9        # CPU smoke test

Random bf16 weights (renderer.families.wan22.model.build_dit, DiTConfig from conf/model/<model>.yaml's `dit`
block). Prints the achieved TFLOP/s; from one more forward under torch.profiler, the raw kernel times of that
profiled forward grouped into attention / matmul / other / idle beside its own wall time (not rescaled into the
unprofiled or depth-scaled time); and the floor: this forward's FLOPs over ceilings measured in the same run
(a large bf16 matmul, and every attention backend at the real shape). --mode both runs the plain path (SDPA
default kernel, no fused kernels, no compile) and then the fast path (auto attention + Triton fused ops +
compiled blocks).
--layers N builds and times N blocks and scales the block part to the full depth (the embeddings and the head
are timed once, separately); the report says so.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from kernels import autotune
from kernels.attention import attention, resolved_backend
from kernels.fused import fused_active, triton_failure
from kernels.settings import KernelSettings
from renderer.families.wan22.model import DiTConfig, build_dit
from renderer.provenance import code_version, provenance



def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="t2v_a14b")
    p.add_argument("--size", default=None, help="W*H in pixels (default: the preset's)")
    p.add_argument("--frames", type=int, default=None)
    p.add_argument("--layers", type=int, default=None, help="time N blocks, scale to the full depth")
    p.add_argument("--mode", choices=("plain", "fast", "both"), default="both")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="bfloat16 (GPU default) or float32 (CPU default)")
    p.add_argument("--backend", default="auto", help="attention backend of the fast path")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="fast path (auto: on CUDA)")
    p.add_argument("--fused", choices=("on", "off"), default="on", help="fast path's Triton ops")
    p.add_argument("--no-profile", action="store_true", help="skip the torch.profiler split")
    p.add_argument("--out", default=None, help="JSON report path")
    return p.parse_args(argv)


def load_preset(name: str) -> dict:
    """conf/model/<name>.yaml as Hydra composes it (renderer/conf.py: the one reader of conf/)."""
    from renderer.conf import group_option

    try:
        return group_option("model", name)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def latent_shape(preset: dict, size: str, frames: int) -> tuple[int, int, int, int]:
    """(C, F, H, W) of the latent for a W*H, `frames` video through the preset's VAE strides."""
    w, h = (int(v) for v in size.lower().replace("x", "*").split("*"))
    st, sh, sw = preset["vae"]["stride"]
    if (frames - 1) % st or h % sh or w % sw:
        raise SystemExit(f"{size} × {frames} frames does not fit the VAE strides {preset['vae']['stride']}")
    return preset["dit"]["in_dim"], (frames - 1) // st + 1, h // sh, w // sw


def count_flops(cfg: DiTConfig, batch: int, tokens: int, layers: int) -> dict[str, float]:
    """FLOPs of one forward with `layers` blocks (a multiply-add counts 2)."""
    b, n, lc, d, f = batch, tokens, cfg.text_len, cfg.dim, cfg.ffn_dim
    per_block_self = 4 * b * n * n * d  # QK^T and PV, every head: 2·2·L²·Dh·Hn
    per_block_cross = 4 * b * n * lc * d
    per_block_lin = 2 * b * n * (6 * d * d + 2 * d * f) + 2 * b * lc * 2 * d * d  # q k v o, cross q o, FFN; text k v
    p = math.prod(cfg.patch_size)
    outside = 2 * b * n * d * p * (cfg.in_dim + cfg.out_dim) + 2 * b * lc * d * (cfg.text_dim + d)
    return {"self_attention": layers * per_block_self, "cross_attention": layers * per_block_cross,
            "linear": layers * per_block_lin + outside,
            "total": layers * (per_block_self + per_block_cross + per_block_lin) + outside}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, n: int) -> list[float]:
    """Seconds of n calls, each bracketed by device syncs (host clock after the device is idle)."""
    out = []
    for _ in range(n):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def measure_ceilings(cfg: DiTConfig, device: torch.device, dtype: torch.dtype, batch: int, tokens: int) -> dict:
    """Matmul and attention rates measured here, now: what the floor is computed from."""
    n = 8192 if device.type == "cuda" else 256  # the CPU run is a smoke test: keep it short
    g = torch.Generator(device=device).manual_seed(0)
    mats = [torch.randn(n, n, device=device, dtype=dtype, generator=g) for _ in range(3)]  # 3 sets: not cache

    def ten_matmuls():  # 10 back to back between syncs: the sync's cost stays out of a 1.4 ms product
        for j in range(10):
            mats[j % 3] @ mats[(j + 1) % 3]

    mm_s = statistics.median(timed(ten_matmuls, device, 3 if device.type == "cuda" else 1)) / 10
    del mats
    hn, dh = cfg.num_heads, cfg.head_dim
    if device.type == "cuda":
        att = autotune.measure_backends(device, dtype, batch, tokens, tokens, hn, dh, reps=2)
    else:
        q = torch.randn(batch, tokens, hn, dh, dtype=dtype, generator=g)  # [B, L, Hn, Dh]
        att = {"sdpa": statistics.median(timed(lambda: attention(q, q, q, backend="sdpa"), device, 3))}
    attn_flops = 4 * batch * tokens * tokens * cfg.dim
    best = min(att, key=att.get)
    return {"matmul_shape": [n, n, n], "matmul_dtype": str(dtype).removeprefix("torch."),
            "matmul_tflops": 2 * n**3 / mm_s / 1e12,
            "attention_seconds": att, "attention_tflops": {k: attn_flops / v / 1e12 for k, v in att.items()},
            "attention_best": best, "attention_best_tflops": attn_flops / att[best] / 1e12}


_ATTN = ("flash", "fmha", "attention", "sdpa", "attn")
_MM = ("gemm", "xmma", "cutlass", "nvjet", "cublas", "wgmma", "matmul", "aten::mm", "aten::addmm", "aten::bmm",
       "aten::baddbmm", "conv", "aten::linear")


def kernel_category(name: str) -> str:
    low = name.lower()
    if any(s in low for s in _ATTN):  # first: cuDNN's and CUTLASS's attention kernels mention gemm pieces too
        return "attention"
    if any(s in low for s in _MM):
        return "matmul"
    return "other"


def profile_split(fn, device: torch.device) -> dict:
    """One call under torch.profiler: device time per category (kernels on CUDA, leaf op self time on CPU)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        fn()
        _sync(device)
    wall = time.perf_counter() - t0
    per_kernel: dict[str, float] = {}
    for evt in prof.events():
        if device.type == "cuda":
            if evt.device_type != DeviceType.CUDA:
                continue
            us = evt.time_range.elapsed_us()
        else:
            if evt.device_type != DeviceType.CPU or not evt.name.startswith("aten::"):
                continue
            us = evt.self_cpu_time_total
        per_kernel[evt.name] = per_kernel.get(evt.name, 0.0) + us / 1e6
    split = {"attention": 0.0, "matmul": 0.0, "other": 0.0}
    for name, s in per_kernel.items():
        split[kernel_category(name)] += s
    busy = sum(split.values())
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:15]
    return {"seconds": split, "idle": max(wall - busy, 0.0), "profiled_wall": wall,
            "top": [{"name": k[:120], "seconds": v, "category": kernel_category(k)} for k, v in top]}


def configure(model, mode: str, args) -> KernelSettings:
    if mode == "plain":
        kernels = KernelSettings(attention="sdpa", fused=False, compile="off")
    else:
        kernels = KernelSettings(attention=args.backend, fused=args.fused == "on", compile=args.compile)
    model.use_kernels(kernels)
    return kernels


def run_mode(model, mode: str, inputs, args, device: torch.device, full_layers: int) -> dict:
    kernels = configure(model, mode, args)
    call = lambda: model(*inputs)  # noqa: E731
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    first = timed(call, device, 1)[0]  # compiles here in the fast path
    warm = timed(call, device, max(args.warmup - 1, 0)) if args.warmup > 1 else []
    times = timed(call, device, args.iters)
    t_model = statistics.median(times)
    res = {"mode": mode, "backend": resolved_backend(kernels.attention), "fused": fused_active(device, kernels.fused),
           "compiled": bool(getattr(model, "_blocks_compiled", False)), "first_forward_s": first,
           "compile_s": sum(model.compile_seconds.values()), "warmup_s": warm, "forward_s": times,
           "timed_layers": len(model.blocks), "triton_failure": triton_failure()}
    n = len(model.blocks)
    if n < full_layers:  # time the part outside the blocks once, scale the blocks to the full depth
        blocks, model.blocks = model.blocks, torch.nn.ModuleList()
        try:
            fixed = statistics.median(timed(call, device, max(args.iters, 1)))
        finally:
            model.blocks = blocks
        res["outside_blocks_s"] = fixed
        res["scale"] = f"timed {n} of {full_layers} blocks; block time ×{full_layers / n:.2f} + embeddings/head"
        # clamp: on a noisy CPU the tiny blocks can time below the run without them; on a GPU blocks dominate
        t_full = fixed + max(t_model - fixed, 0.0) * full_layers / n
    else:
        t_full = t_model
    res["forward_timed_model_s"] = t_model
    res["forward_full_s"] = t_full
    if not args.no_profile:
        # the raw times of the profiled forward (the timed model, profiler on), not rescaled into the unprofiled
        # or depth-scaled time: the split and the wall beside it are one measurement
        prof = profile_split(call, device)
        res["profile"] = {"kernel_s": prof["seconds"], "busy_s": sum(prof["seconds"].values()), "idle_s": prof["idle"],
                          "profiled_wall_s": prof["profiled_wall"], "layers": n,
                          "what": ("CUDA kernel time per category" if device.type == "cuda"
                                   else "aten op self CPU time per category") + f" of one profiled forward of the "
                                  f"{n}-block model, profiler on; not rescaled"}
        res["top_kernels"] = prof["top"]
    if device.type == "cuda":
        res["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return res


def main(argv=None) -> dict:
    args = parse_args(argv)
    preset = load_preset(args.model)
    size, frames = args.size or preset["size"], args.frames or preset["frames"]
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    full_cfg = DiTConfig.from_dict(preset["dit"])
    layers = min(args.layers or full_cfg.num_layers, full_cfg.num_layers)
    cfg = DiTConfig.from_dict({**full_cfg.to_dict(), "num_layers": layers})
    c, f, h, w = latent_shape(preset, size, frames)
    pt, ph, pw = cfg.patch_size
    tokens = (f // pt) * (h // ph) * (w // pw)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(args.batch, c, f, h, w, device=device, generator=g)  # [B, C, F, H, W] latent
    t = torch.full((args.batch,), 500.0, device=device)  # [B]
    ctx = torch.randn(args.batch, cfg.text_len, cfg.text_dim, device=device, generator=g)  # [B, Lc, text_dim]

    t0 = time.perf_counter()
    model = build_dit(cfg, dtype=dtype, device=device, seed=0)
    build_s = time.perf_counter() - t0
    weights_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9

    ceil = measure_ceilings(cfg, device, dtype, args.batch, tokens)
    flops = count_flops(full_cfg, args.batch, tokens, full_cfg.num_layers)
    attn_flops = flops["self_attention"] + flops["cross_attention"]
    floor = attn_flops / (ceil["attention_best_tflops"] * 1e12) + flops["linear"] / (ceil["matmul_tflops"] * 1e12)

    progress(f"built {layers} blocks in {build_s:.1f} s; ceilings: matmul {ceil['matmul_tflops']:.4g} TFLOP/s, "
             f"attention {ceil['attention_best']} {ceil['attention_best_tflops']:.4g} TFLOP/s; floor {floor:.3f} s")

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results: list[dict] = []
    report = {"code_version": code_version(), "provenance": provenance(),
              "model": args.model, "size": size, "frames": frames, "latent": [c, f, h, w], "tokens": tokens,
              "batch": args.batch, "dtype": str(dtype), "layers_full": full_cfg.num_layers, "layers_timed": layers,
              "device": dev_name, "torch": torch.__version__, "build_s": build_s, "weights_gb": weights_gb,
              "flops": flops, "ceilings": ceil, "floor_s": floor, "results": results}
    modes = ["plain", "fast"] if args.mode == "both" else [args.mode]
    with torch.no_grad():
        for mode in modes:
            r = run_mode(model, mode, (x, t, ctx), args, device, full_cfg.num_layers)
            r["tflops"] = flops["total"] / r["forward_full_s"] / 1e12
            r["x_floor"] = r["forward_full_s"] / floor
            results.append(r)
            progress(f"{mode}: {r['forward_full_s']:.3f} s per forward, first forward {r['first_forward_s']:.1f} s")
            write_json(args.out, report)  # after each mode: a run cut short still leaves its numbers
    if len(results) == 2:
        report["speedup"] = results[0]["forward_full_s"] / results[1]["forward_full_s"]
    print_report(report)
    write_json(args.out, report)
    return report


def progress(msg: str) -> None:
    print(f"[profile_step {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_json(path: str | None, report: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=1, default=str))


def print_report(r: dict) -> None:
    c = r["ceilings"]
    pf = {k: v / 1e15 for k, v in r["flops"].items()}
    print(f"{r['model']} {r['size']} {r['frames']} frames: {r['tokens']:,} tokens, batch {r['batch']}, {r['dtype']}, "
          f"{r['device']}, torch {r['torch']}, weights {r['weights_gb']:.1f} GB")
    if r["layers_timed"] < r["layers_full"]:
        print(f"NOTE: timed {r['layers_timed']} of {r['layers_full']} blocks; times below are scaled to the full "
              f"depth (block time × {r['layers_full'] / r['layers_timed']:.2f}, embeddings/head timed once)")
    others = ", ".join(f"{k} {v:.4g}" for k, v in sorted(c["attention_tflops"].items(), key=lambda kv: -kv[1]))
    print(f"ceilings (measured now): {c['matmul_dtype']} matmul {c['matmul_shape'][0]}³ "
          f"{c['matmul_tflops']:.4g} TFLOP/s; "
          f"attention at this shape, TFLOP/s: {others}")
    print(f"FLOPs per forward: self-attn {pf['self_attention']:.4g} PF, cross-attn {pf['cross_attention']:.4g} PF, "
          f"linear {pf['linear']:.4g} PF, total {pf['total']:.4g} PF -> floor {r['floor_s']:.3f} s at these ceilings")
    print(f"{'mode':<6}{'s/fwd':>9}{'TFLOP/s':>10}{'×floor':>8}{'peak GB':>9}{'compile s':>10}  backend")
    for x in r["results"]:
        mem = f"{x['peak_memory_gb']:>9.1f}" if "peak_memory_gb" in x else f"{'-':>9}"
        print(f"{x['mode']:<6}{x['forward_full_s']:>9.3f}{x['tflops']:>10.4g}{x['x_floor']:>8.2f}{mem}"
              f"{x['compile_s']:>10.1f}  {x['backend']}{' +fused' if x['fused'] else ''}"
              f"{' +compile' if x['compiled'] else ''}")
    profiled = [x for x in r["results"] if "profile" in x]
    if profiled:
        print(f"profiled forward, raw ({profiled[0]['profile']['what'].split(' of one')[0]}; "
              f"{profiled[0]['profile']['layers']} blocks, profiler on, not rescaled), seconds:")
        print(f"{'mode':<6}{'attn':>9}{'matmul':>9}{'other':>9}{'busy':>9}{'idle':>9}{'wall':>9}")
        for x in profiled:
            p, k = x["profile"], x["profile"]["kernel_s"]
            print(f"{x['mode']:<6}{k['attention']:>9.4f}{k['matmul']:>9.4f}{k['other']:>9.4f}{p['busy_s']:>9.4f}"
                  f"{p['idle_s']:>9.4f}{p['profiled_wall_s']:>9.4f}")
    if "speedup" in r:
        print(f"speedup fast / plain: {r['speedup']:.2f}×")
    for x in r["results"]:
        if x.get("triton_failure"):
            print(f"WARNING: {x['mode']}: a Triton kernel failed and the plain math ran instead: {x['triton_failure']}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(sys.argv[1:])
