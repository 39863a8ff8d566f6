"""Block streaming against a resident expert: seconds per forward and peak GPU memory, random bf16 weights.

    python3 -m benchmarks.offload_step --model t2v_a14b --size 832*480 --frames 81

Both runs are eager (fused kernels, no compile) so the difference is the streaming alone. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from renderer.families.wan22.model import build_dit
from renderer.offload import stream_blocks
from renderer.presets import load_preset, parse_size
from renderer.provenance import code_version, provenance


def timed_forwards(model, x, t, ctx, n: int) -> list[float]:
    out = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            model(x, t, ctx)
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="t2v_a14b")
    ap.add_argument("--size", default="832*480")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--iters", type=int, default=2)
    args = ap.parse_args(argv)
    preset = load_preset(args.model)
    w, h = parse_size(args.size)
    st, sh, sw = preset.vae.stride
    dev = torch.device("cuda")
    x = torch.randn(1, preset.dit.in_dim, (args.frames - 1) // st + 1, h // sh, w // sw, device=dev)
    t, ctx = torch.tensor([900.0], device=dev), torch.randn(1, 512, preset.dit.text_dim, device=dev)
    model = build_dit(preset.dit, dtype=torch.bfloat16, device=dev, seed=0)
    model.compile_mode = "off"
    report = {"model": args.model, "size": args.size, "frames": args.frames, "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "code_version": code_version(), "provenance": provenance()}
    timed_forwards(model, x, t, ctx, 1)  # warm-up
    torch.cuda.reset_peak_memory_stats()
    report["resident_s"] = timed_forwards(model, x, t, ctx, args.iters)
    report["resident_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    t0 = time.perf_counter()
    stream_blocks(model, dev)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    report["pin_s"] = time.perf_counter() - t0
    timed_forwards(model, x, t, ctx, 1)  # warm-up
    torch.cuda.reset_peak_memory_stats()
    report["stream_s"] = timed_forwards(model, x, t, ctx, args.iters)
    report["stream_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    report["weights_gb"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    print(json.dumps(report), flush=True)
    return report


if __name__ == "__main__":
    main()
