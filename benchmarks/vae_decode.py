"""Time the VAE decode of one shot on one GPU (untiled) and split over a render group (renderer/vae/parallel_decode).

    python -m benchmarks.vae_decode --version 2.1 --size 1280*720 --frames 81 --out out/vae/1gpu.json
    torchrun --standalone --nproc-per-node 2 -m benchmarks.vae_decode --version 2.1 --size 1280*720 --frames 81 \
        --check --out out/vae/2gpu.json
    python -m benchmarks.vae_decode --tiny --size 64*48 --frames 9 --device cpu          # CPU smoke test

Random weights in the official configuration (or --checkpoint Wan2.1_VAE.pth / Wan2.2_VAE.pth), a random
normalised latent drawn on the CPU from --seed (the same on every rank). Each rank times `decode_distributed`
(with one process: `vae.decode(tile=False)`) --repeat times after one warm-up decode, between barriers and device
syncs, and reports its peak memory. --check: rank 0 then decodes the same latent alone, untiled, and reports
max |group - one process| (fp32, TF32 off: expect <= 1e-5; bf16: the kernels' rounding). Rank 0 prints one JSON line and
writes --out, with the code version it ran at (renderer/provenance.py).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from renderer.provenance import code_version, provenance
from renderer.vae import build_vae, load_vae
from renderer.vae.parallel_decode import decode_distributed

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.vae_decode", description=__doc__.split("\n")[0])
    ap.add_argument("--version", choices=("2.1", "2.2"), default="2.1", help="Wan2.1 (A14B) or Wan2.2 (TI2V-5B) VAE")
    ap.add_argument("--size", default="1280*720", help="W*H of the video in pixels")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on CUDA, else float32")
    ap.add_argument("--device", default=None, help="default: the rank's GPU, else cpu")
    ap.add_argument("--checkpoint", default=None, help="a Wan VAE .pth or diffusers vae/ folder (default: random)")
    ap.add_argument("--tiny", action="store_true", help="the tiny random VAE (CPU smoke tests)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true", help="compare with one process decoding untiled (rank 0)")
    ap.add_argument("--out", default=None, help="JSON report path (rank 0)")
    return ap.parse_args(argv)


def _group(device_arg: str | None):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return None
    from renderer.parallel import ParallelConfig, init_group

    backend = "gloo" if device_arg == "cpu" or not torch.cuda.is_available() else None
    return init_group(ParallelConfig(ulysses=world), backend)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def progress(msg: str) -> None:
    print(f"[vae_decode {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    group = _group(args.device)
    rank, world = (group.rank, group.world_size) if group else (0, 1)
    device = group.device if group else torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if dtype == torch.float32:  # fp32 means fp32: cuDNN's default TF32 convs would round per algorithm and shape
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    if args.checkpoint:
        vae = load_vae(args.checkpoint, dtype=dtype, device=device)
    else:
        vae = build_vae(args.version, tiny=args.tiny, dtype=dtype, device=device, seed=0)
    w, h = (int(v) for v in args.size.lower().replace("x", "*").split("*"))
    st, s, _ = vae.stride
    if (args.frames - 1) % st or h % s or w % s:
        raise SystemExit(f"{args.size} x {args.frames} frames does not fit the VAE strides t{st} x h{s} x w{s}")
    shape = (1, vae.z_dim, (args.frames - 1) // st + 1, h // s, w // s)
    latent = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed)).to(device, dtype)  # [1,z,t,h,w]
    decode = (lambda: decode_distributed(vae, latent, group)) if group else (lambda: vae.decode(latent, tile=False))

    def barrier():
        _sync(device)
        if group:
            group.barrier()

    progress(f"rank {rank}/{world}: Wan{args.version} VAE, latent {list(shape)}, {dtype}, {device}; warm-up")
    barrier()
    decode()
    seconds = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(max(args.repeat, 1)):
        barrier()
        t0 = time.perf_counter()
        video = decode()  # rank 0: [1, 3, F, H, W] fp32; the others: None
        barrier()
        seconds.append(time.perf_counter() - t0)
        progress(f"rank {rank}: decode {i + 1}/{args.repeat}: {seconds[-1]:.3f} s")
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    peaks = [None] * world
    if group:
        dist.all_gather_object(peaks, peak)
    else:
        peaks = [peak]
    report = None
    if rank == 0:
        report = {"benchmark": "vae_decode", "vae": f"Wan{args.version}", "checkpoint": args.checkpoint,
                  "tiny": args.tiny, "size": args.size, "frames": args.frames, "latent": list(shape),
                  "dtype": str(dtype).removeprefix("torch."), "tf32": torch.backends.cudnn.allow_tf32, "gpus": world,
                  "method": "halo-exchange split (decode_distributed)" if group else "one process, untiled",
                  "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  "torch": torch.__version__, "seconds": seconds, "median_s": statistics.median(seconds),
                  "peak_gpu_allocated_gb_per_rank": peaks, "video_shape": list(video.shape),
                  "code_version": code_version(), "provenance": provenance(),
                  "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if args.check:
            ref = vae.decode(latent, tile=False)  # [1, 3, F, H, W]: one process, untiled
            report["max_abs_err_vs_one_process"] = (video - ref).abs().max().item()
        print(json.dumps(report), flush=True)
        if args.out:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.tmp")
            tmp.write_text(json.dumps(report, indent=1))
            os.replace(tmp, out)
    if group:
        group.barrier()
        group.close()
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
