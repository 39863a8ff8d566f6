"""Microbenchmark of the fast tier's FP8 kernels against their bf16 twins, at the A14B 720p shapes.

    python -m benchmarks.fp8_micro out=out/fp8_micro.json                # an H200: the issue-14 shapes
    python -m benchmarks.fp8_micro smoke=true out=out/fp8_micro.json     # CPU: small shapes, CPU paths, numerics

Rows (each: median seconds over `reps` after a warm-up, TFLOP/s, and the relative RMS error against the bf16 twin):
  linear   [75600×5120] @ [5120×13824] (the FFN's first linear at 1280×720×81): FP8Linear (torch._scaled_mm, row-wise
           scales, activation quantisation included) vs nn.Linear in bf16;
  attention 1×40 heads×75,600 tokens×128: fp8_triton (kernels/fp8_attention.py, quantisation pre-pass included) vs
           SDPA restricted to cuDNN (the fastest bf16 kernel here, 580 TFLOP/s in anchors.md) and flash.
Targets (issue 14; a benchmark, not a test): FP8 attention ≥ 1.3× cuDNN; FP8 linear ~1.8× bf16 (anchors.md).
key=value arguments: smoke, reps, out, tokens, heads, head_dim, dim, ffn_dim.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

from renderer.provenance import code_version, provenance

DEFAULTS = {"smoke": False, "reps": 5, "out": "out/fp8_micro.json", "tokens": 75600, "heads": 40, "head_dim": 128,
            "dim": 5120, "ffn_dim": 13824}
SMOKE = {"tokens": 256, "heads": 2, "head_dim": 64, "dim": 128, "ffn_dim": 256, "reps": 2}


def _time(fn, reps: int, device: torch.device) -> float:
    fn()  # warm-up: autotune, cuBLAS handles, Triton compile
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_linear(o: dict, device: torch.device) -> dict:
    from kernels.fp8 import FP8Linear, fp8_supported, relative_rms

    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    lin = torch.nn.Linear(o["dim"], o["ffn_dim"], device=device, dtype=dt)
    x = torch.randn(o["tokens"], o["dim"], device=device, dtype=dt)  # [L, D]
    f8 = FP8Linear(lin)
    flops = 2 * o["tokens"] * o["dim"] * o["ffn_dim"]
    with torch.no_grad():
        t_ref = _time(lambda: lin(x), o["reps"], device)
        t_f8 = _time(lambda: f8(x), o["reps"], device)
        err = relative_rms(f8(x).float(), lin(x).float())
    return {"row": "linear", "shape": [o["tokens"], o["dim"], o["ffn_dim"]], "fp8_path": "scaled_mm" if
            fp8_supported(device) else "cpu reference", "bf16_s": t_ref, "fp8_s": t_f8, "speedup": t_ref / t_f8,
            "bf16_tflops": flops / t_ref / 1e12, "fp8_tflops": flops / t_f8 / 1e12, "rel_rms_err": err}


def bench_attention(o: dict, device: torch.device) -> dict:
    from kernels.attention import attention
    from kernels.fp8 import relative_rms

    row = {"row": "attention", "shape": [1, o["heads"], o["tokens"], o["head_dim"]]}
    if device.type != "cuda":
        row["skipped"] = "no GPU: the kernel's numerics are tested under TRITON_INTERPRET=1 (tests/test_fp8.py)"
        return row
    q, k, v = (torch.randn(1, o["tokens"], o["heads"], o["head_dim"], device=device, dtype=torch.bfloat16)
               for _ in range(3))  # [B, L, H, D]
    flops = 4 * o["tokens"] ** 2 * o["heads"] * o["head_dim"]
    with torch.no_grad():
        ref = attention(q, k, v, backend="sdpa_cudnn")
        for name in ("sdpa_cudnn", "sdpa_flash", "fp8_triton"):
            try:
                t = _time(lambda: attention(q, k, v, backend=name), o["reps"], device)
                row[f"{name}_s"], row[f"{name}_tflops"] = t, flops / t / 1e12
            except Exception as e:  # noqa: BLE001 - a kernel that cannot run here is reported, not fatal
                row[f"{name}_error"] = f"{type(e).__name__}: {e}"[:300]
        if "fp8_triton_s" in row:
            row["rel_rms_err_vs_cudnn"] = relative_rms(attention(q, k, v, backend="fp8_triton").float(), ref.float())
            if "sdpa_cudnn_s" in row:
                row["speedup_vs_cudnn"] = row["sdpa_cudnn_s"] / row["fp8_triton_s"]
    return row


def main(argv: list[str] | None = None) -> int:
    o = dict(DEFAULTS)
    for a in list(sys.argv[1:] if argv is None else argv):
        key, sep, raw = a.partition("=")
        if not sep or key not in DEFAULTS:
            print(f"error: argument {a!r}: use key=value with key one of {', '.join(DEFAULTS)}", file=sys.stderr)
            return 2
        o[key] = raw if key == "out" else yaml.safe_load(raw)
    if o["smoke"]:
        o.update({k: v for k, v in SMOKE.items()})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = [bench_linear(o, device), bench_attention(o, device)]
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "smoke": bool(o["smoke"]), "rows": rows,
              "code_version": code_version(), "provenance": provenance(), "command": " ".join(sys.argv),
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out = Path(o["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    for r in rows:
        print(json.dumps(r))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
