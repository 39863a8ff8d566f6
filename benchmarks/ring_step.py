"""Time ring attention's per-block work: the plain step (attention_lse + merge_partial) against the Triton step.

    python -m benchmarks.ring_step --lq 18900 --lk 75600 --heads 40 --dim 128 --blocks 4 --out out/ring_step.json
    python -m benchmarks.ring_step --lq 20 --lk 40 --heads 2 --dim 16 --blocks 2 --device cpu   # CPU smoke test

One rank's view of a ring of --blocks ranks: its Lq queries attend to Lk keys arriving in --blocks equal blocks
(the default is T2V-A14B 720p, 75,600 tokens, on a ring of 4). Each step kind runs the whole ring's worth of blocks
--iters times after a warm-up, between device syncs; the JSON has the seconds, the TFLOP/s of the attention
(4·Lq·Lk·heads·dim FLOPs) and max |triton - plain| / max |plain| of the merged output. On a CPU the Triton step
runs through Triton's interpreter (set here before triton is imported): a correctness smoke test, not a timing.
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

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ring_step", description=__doc__.split("\n")[0])
    ap.add_argument("--lq", type=int, default=18900, help="this rank's queries")
    ap.add_argument("--lk", type=int, default=75600, help="keys over the whole ring")
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--blocks", type=int, default=4, help="ring size: Lk arrives in this many blocks")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on CUDA, else float32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--out", default=None)
    return ap.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the kernel runs interpreted
    from kernels.ring_triton import triton_ring_step
    from renderer.parallel.attention import plain_ring_step
    from renderer.provenance import code_version, provenance

    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, args.lq, args.heads, args.dim, device=device, dtype=dtype, generator=g)  # [1, Lq, H, Dh]
    k = torch.randn(1, args.lk, args.heads, args.dim, device=device, dtype=dtype, generator=g)  # [1, Lk, H, Dh]
    v = torch.randn(1, args.lk, args.heads, args.dim, device=device, dtype=dtype, generator=g)
    bounds = [round(i * args.lk / args.blocks) for i in range(args.blocks + 1)]

    def ring(step):
        out = lse = None
        for a, b in zip(bounds, bounds[1:]):
            out, lse = step(q, k[:, a:b], v[:, a:b], out, lse)  # fp32 [1, Lq, H, Dh], [1, H, Lq]
        return out

    results, outputs = {}, {}
    for name, step in (("plain", plain_ring_step), ("triton", triton_ring_step)):
        outputs[name] = ring(step)  # warm-up (Triton compiles here)
        seconds = []
        for _ in range(max(args.iters, 1)):
            _sync(device)
            t0 = time.perf_counter()
            ring(step)
            _sync(device)
            seconds.append(time.perf_counter() - t0)
        flops = 4 * args.lq * args.lk * args.heads * args.dim
        results[name] = {"seconds": seconds, "median_s": statistics.median(seconds),
                         "tflops": flops / statistics.median(seconds) / 1e12}
        print(f"[ring_step] {name}: {results[name]['median_s']:.4f} s per ring of {args.blocks} blocks",
              file=sys.stderr, flush=True)
    ref = outputs["plain"]
    report = {"benchmark": "ring_step", "lq": args.lq, "lk": args.lk, "heads": args.heads, "dim": args.dim,
              "blocks": args.blocks, "dtype": str(dtype).removeprefix("torch."),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreted)",
              "torch": torch.__version__, "results": results,
              "speedup_triton_vs_plain": results["plain"]["median_s"] / results["triton"]["median_s"],
              "max_rel_diff": ((outputs["triton"] - ref).abs().max() / ref.abs().max()).item(),
              "code_version": code_version(), "provenance": provenance(),
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(json.dumps(report), flush=True)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
