"""Microbenchmark of the fast tier's FP8 kernels against their bf16 twins, at the A14B 720p shapes.

    python -m benchmarks.fp8_micro out=out/fp8_micro.json                # an H200: the issue-14 shapes
    python -m benchmarks.fp8_micro sweep=true out=out/fp8_sweep.json     # + every attention config (≤ ~120 s)
    python -m benchmarks.fp8_micro smoke=true out=out/fp8_micro.json     # CPU: small shapes, CPU paths, numerics
    TRITON_INTERPRET=1 python -m benchmarks.fp8_micro smoke=true sweep=true out=...   # CPU: the sweep's code path
    python -m benchmarks.fp8_micro aot=true out=out/fp8_aot.json         # no GPU needed: compile for sm_90

Rows (each: median seconds over `reps` after a warm-up, TFLOP/s, and the relative RMS error against the bf16 twin):
  linear   [75600×5120] @ [5120×13824] (the FFN's first linear at 1280×720×81): FP8Linear (activation quantisation
           included) vs nn.Linear in bf16, split into quantisation (Triton kernel and the eager reference),
           torch._scaled_mm alone on pre-quantised operands, and the layer's total;
  attention 1×40 heads×75,600 tokens×128: fp8_triton (kernels/fp8_attention.py, pre-pass included) vs SDPA
           restricted to cuDNN (the fastest bf16 kernel here, 580 TFLOP/s in anchors.md) and flash;
  sweep    (sweep=true) each config of kernels/fp8_attention.SWEEP_CONFIGS: first-call seconds (Triton compile),
           pre-pass and kernel timed separately, TFLOP/s, error vs the bf16 reference; the fastest is the JSON's
           "best_config" and is printed as the line to paste into kernels/fp8_attention.py (HOPPER_CONFIG).
           Configs are skipped once `sweep_budget_s` has passed (reported as skipped).
  aot_sm90 (aot=true, instead of timing) every kernel compiled ahead of time for sm_90 (Hopper) on this machine,
           no GPU needed: registers, spilled (local) bytes, shared memory, FP8 wgmma and TMA instructions, compile
           seconds — what fits before the GPU run (aot_configs=N: the first N sweep configs, HOPPER_CONFIG first).
Targets (issue 14; a benchmark, not a test): FP8 attention ≥ 1.3× cuDNN; FP8 linear ~1.8× bf16 (anchors.md).
key=value arguments: smoke, sweep, aot, aot_configs, reps, sweep_reps, sweep_budget_s, out, tokens, heads,
head_dim, dim, ffn_dim.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from renderer.kvargs import parse_key_values
from renderer.provenance import code_version, provenance

DEFAULTS = {"smoke": False, "sweep": False, "aot": False, "aot_configs": 0, "reps": 5, "sweep_reps": 3,
            "sweep_budget_s": 90.0, "out": "out/fp8_micro.json", "tokens": 75600, "heads": 40, "head_dim": 128,
            "dim": 5120, "ffn_dim": 13824}
SMOKE = {"tokens": 128, "heads": 2, "head_dim": 64, "dim": 128, "ffn_dim": 256, "reps": 2, "sweep_reps": 1}


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


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def bench_linear(o: dict, device: torch.device) -> dict:
    from kernels.fp8 import (HAVE_TRITON, FP8Linear, fp8_supported, quantize_rowwise, quantize_rowwise_triton,
                             relative_rms)

    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    lin = torch.nn.Linear(o["dim"], o["ffn_dim"], device=device, dtype=dt)
    x = torch.randn(o["tokens"], o["dim"], device=device, dtype=dt)  # [L, D]
    f8 = FP8Linear(lin)
    flops = 2 * o["tokens"] * o["dim"] * o["ffn_dim"]
    row = {"row": "linear", "shape": [o["tokens"], o["dim"], o["ffn_dim"]],
           "fp8_path": "scaled_mm" if fp8_supported(device) else "cpu reference",
           "quantisation": "triton" if (f8.triton_quant and device.type == "cuda") else "eager"}
    with torch.no_grad():
        t_ref = _time(lambda: lin(x), o["reps"], device)
        t_f8 = _time(lambda: f8(x), o["reps"], device)
        row.update({"bf16_s": t_ref, "fp8_s": t_f8, "speedup": t_ref / t_f8, "bf16_tflops": flops / t_ref / 1e12,
                    "fp8_tflops": flops / t_f8 / 1e12, "rel_rms_err": relative_rms(f8(x).float(), lin(x).float())})
        row["quant_eager_s"] = _time(lambda: quantize_rowwise(x), o["reps"], device)
        if HAVE_TRITON and (device.type == "cuda" or _interpreting()):
            row["quant_triton_s"] = _time(lambda: quantize_rowwise_triton(x), o["reps"], device)
            (a, sa), (b, sb) = quantize_rowwise_triton(x), quantize_rowwise(x)
            row["quant_triton_equals_eager"] = bool(torch.equal(a.float(), b.float()) and torch.equal(sa, sb))
        if f8.use_scaled_mm:
            xq, xs = quantize_rowwise(x)
            bias = f8.bias.to(torch.bfloat16) if f8.bias is not None else None
            t_mm = _time(lambda: torch._scaled_mm(xq, f8.weight_fp8.t(), scale_a=xs, scale_b=f8.weight_scale.t(),
                                                  bias=bias, out_dtype=torch.bfloat16), o["reps"], device)
            row.update({"scaled_mm_s": t_mm, "scaled_mm_tflops": flops / t_mm / 1e12,
                        "scaled_mm_speedup": t_ref / t_mm})
    return row


def _attention_inputs(o: dict, device: torch.device):
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    return [torch.randn(1, o["tokens"], o["heads"], o["head_dim"], device=device, dtype=dt)
            for _ in range(3)]  # 3 × [B, L, H, D]


def _attention_runs_here(device: torch.device) -> bool:
    from kernels.fp8 import HAVE_TRITON

    return HAVE_TRITON and (device.type == "cuda" or _interpreting())


def bench_attention(o: dict, device: torch.device) -> dict:
    from kernels.attention import attention
    from kernels.fp8 import relative_rms
    from kernels.fp8_attention import default_config

    row = {"row": "attention", "shape": [1, o["heads"], o["tokens"], o["head_dim"]]}
    if device.type != "cuda":
        row["skipped"] = "no GPU: the kernel's numerics are tested under TRITON_INTERPRET=1 (tests/test_fp8.py)"
        return row
    q, k, v = _attention_inputs(o, device)
    flops = 4 * o["tokens"] ** 2 * o["heads"] * o["head_dim"]
    row["fp8_config"] = default_config(device).as_dict()
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


# a config whose error against bf16 exceeds this is reported but never picked (tests/test_fp8_triton.py's bound)
ATTN_ERR_BOUND = 0.08


def sweep_attention(o: dict, device: torch.device, t_start: float, save=lambda row: None) -> dict:
    """Every config of SWEEP_CONFIGS (two small ones in smoke mode): compile, pre-pass, kernel, error. `save(row)`
    runs after each config, so a config that crashes the process leaves the ones before it on disk."""
    from kernels.attention import attention
    from kernels.fp8 import relative_rms
    from kernels.fp8_attention import SWEEP_CONFIGS, AttnConfig, attend, prepare

    row = {"row": "attention_sweep", "shape": [1, o["heads"], o["tokens"], o["head_dim"]], "configs": []}
    if not _attention_runs_here(device):
        row["skipped"] = "no GPU and not TRITON_INTERPRET=1: the sweep needs the Triton kernel"
        return row
    configs = SWEEP_CONFIGS if not o["smoke"] else (AttnConfig(64, 64, 4, 2), AttnConfig(32, 64, 4, 3, tma=True))
    q, k, v = _attention_inputs(o, device)
    flops = 4 * o["tokens"] ** 2 * o["heads"] * o["head_dim"]
    upcast = not (device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9))
    with torch.no_grad():
        ref = attention(q, k, v, backend="sdpa_cudnn" if device.type == "cuda" else "sdpa").float()
        try:
            t_ref = _time(lambda: attention(q, k, v, backend="sdpa_cudnn"), o["sweep_reps"], device) \
                if device.type == "cuda" else None
        except Exception:  # noqa: BLE001 - no cuDNN attention here: speedups are left out
            t_ref = None
        row["sdpa_cudnn_s"] = t_ref
        for cfg in configs:
            entry = {"config": cfg.as_dict()}
            row["configs"].append(entry)
            if time.perf_counter() - t_start > o["sweep_budget_s"]:
                entry["skipped"] = f"sweep budget of {o['sweep_budget_s']} s spent"
                continue
            try:
                t0 = time.perf_counter()
                prep = prepare(q, k, v, cfg)
                out = attend(prep, torch.empty_like(q), k.shape[1], cfg, upcast)  # compiles both
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                entry["first_call_s"] = time.perf_counter() - t0
                entry["prepass_s"] = _time(lambda: prepare(q, k, v, cfg), o["sweep_reps"], device)
                entry["kernel_s"] = _time(lambda: attend(prep, out, k.shape[1], cfg, upcast), o["sweep_reps"],
                                          device)
                entry["total_s"] = entry["prepass_s"] + entry["kernel_s"]
                entry["kernel_tflops"] = flops / entry["kernel_s"] / 1e12
                entry["total_tflops"] = flops / entry["total_s"] / 1e12
                entry["rel_rms_err_vs_bf16"] = relative_rms(out.float(), ref)
                if t_ref:
                    entry["speedup_vs_cudnn"] = t_ref / entry["total_s"]
            except Exception as e:  # noqa: BLE001 - a config that does not fit (shared memory) is reported
                entry["error"] = f"{type(e).__name__}: {e}"[:300]
            print(f"[fp8_micro]   {json.dumps(entry)}", flush=True)
            save(row)
    timed = [e for e in row["configs"] if "total_s" in e and e["rel_rms_err_vs_bf16"] <= ATTN_ERR_BOUND]
    if timed:
        best = min(timed, key=lambda e: e["total_s"])
        row["best_config"] = best["config"]
        row["best_total_s"] = best["total_s"]
        c = best["config"]
        row["paste"] = f"HOPPER_CONFIG = AttnConfig({', '.join(f'{k}={v}' for k, v in c.items())})"
    row["sweep_s"] = time.perf_counter() - t_start
    return row


H100_H200_MAX_SHARED = 232448  # bytes of shared memory one block may use on sm_90


def _aot(fn, signature: dict, constexprs: dict, num_warps: int, num_stages: int, divisible=()) -> dict:
    """Compile one kernel for sm_90 without a GPU; its resource use from cuobjdump (the wheel's) on the cubin."""
    import subprocess

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    t0 = time.perf_counter()
    k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": True})
    entry = {"compile_s": time.perf_counter() - t0, "shared": k.metadata.shared}
    ptx = k.asm["ptx"]
    entry["fp8_wgmma"] = sum(1 for line in ptx.splitlines() if "wgmma.mma_async" in line and "e4m3.e4m3" in line)
    entry["tma_loads"] = ptx.count("cp.async.bulk.tensor")
    cubin = Path(os.environ.get("TMPDIR", "/tmp")) / f"wanrender_fp8_aot_{os.getpid()}.cubin"
    try:
        cubin.write_bytes(k.asm["cubin"])
        tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        res = subprocess.run([str(tool), "-res-usage", str(cubin)], capture_output=True, text=True, timeout=60)
        for field in res.stdout.split():
            key, _, val = field.partition(":")
            if key in ("REG", "LOCAL") and val.isdigit():
                entry["registers" if key == "REG" else "local_bytes"] = int(val)
    except (OSError, subprocess.SubprocessError) as e:  # no cuobjdump: compile facts only
        entry["resource_error"] = f"{type(e).__name__}: {e}"[:200]
    finally:
        cubin.unlink(missing_ok=True)
    return entry


def aot_report(o: dict) -> dict:
    """The FP8 kernels compiled for sm_90 at the benchmark's head dim: the attention kernel per config, the
    pre-pass kernels and the row-wise quantisation (at `dim` and `ffn_dim` columns)."""
    from kernels import fp8, fp8_attention as fa

    row = {"row": "aot_sm90", "head_dim": o["head_dim"], "max_shared": H100_H200_MAX_SHARED, "kernels": []}
    if _interpreting():
        row["skipped"] = "TRITON_INTERPRET=1: the interpreter does not compile; run without it"
        return row
    if not fp8.HAVE_TRITON:
        row["skipped"] = "triton is not installed"
        return row
    import triton

    d = o["head_dim"]
    configs = [fa.HOPPER_CONFIG] + [c for c in fa.SWEEP_CONFIGS if c != fa.HOPPER_CONFIG]
    configs = configs[:o["aot_configs"]] if o["aot_configs"] else configs
    attn_sig = {n: "i32" for n in fa._fp8_attn_fwd.arg_names}
    attn_sig.update({n: "*fp32" for n in ("qs_ptr", "ks_ptr", "vs_ptr")})
    attn_sig.update({"o_ptr": "*bf16", "sm_scale_log2": "fp32"})
    attn_sig.update({n: "constexpr" for n in ("D", "BLOCK_M", "BLOCK_N", "UPCAST", "ROUND_P", "TMA", "FAST_ACC",
                                               "EXP16")})
    jobs = []
    for c in configs:
        sig = dict(attn_sig)
        if c.tma:
            sig.update({"q_ptr": f"tensordesc<fp8e4nv[{c.block_m}, {d}]>",
                        "k_ptr": f"tensordesc<fp8e4nv[{c.block_n}, {d}]>",
                        "v_ptr": f"tensordesc<fp8e4nv[{d}, {c.block_n}]>"})
        else:
            sig.update({n: "*fp8e4nv" for n in ("q_ptr", "k_ptr", "v_ptr")})
        div = ["qs_ptr", "ks_ptr", "vs_ptr", "o_ptr", "lq_pad", "lk_pad", "o_stride_b", "o_stride_l", "o_stride_h"]
        jobs.append(({"kernel": "fp8_attention", "config": c.as_dict()}, fa._fp8_attn_fwd, sig,
                     {"D": d, "BLOCK_M": c.block_m, "BLOCK_N": c.block_n, "UPCAST": False, "ROUND_P": False,
                      "TMA": c.tma, "FAST_ACC": c.fast_acc,
                      "EXP16": c.exp16}, c.num_warps, c.num_stages,
                     div + ([] if c.tma else ["q_ptr", "k_ptr", "v_ptr"])))
    block = fa.HOPPER_CONFIG.block_n
    pre_warps = 8 if block * d >= 16384 else 4
    jobs.append(({"kernel": "prepass_qk", "block": block}, fa._quantize_block_kernel,
                 {"x_ptr": "*bf16", "mean_ptr": "*fp32", "out_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "n_tokens": "i32",
                  "n_heads": "i32", "stride_b": "i32", "stride_l": "i32", "stride_h": "i32", "n_blocks": "i32",
                  "l_pad": "i32", "D": "constexpr", "BLOCK": "constexpr", "CENTRE": "constexpr"},
                 {"D": d, "BLOCK": block, "CENTRE": True}, pre_warps, 1,
                 ["x_ptr", "mean_ptr", "out_ptr", "scale_ptr", "stride_b", "stride_l", "stride_h", "l_pad"]))
    jobs.append(({"kernel": "prepass_v", "block": block}, fa._quantize_v_kernel,
                 {"x_ptr": "*bf16", "scale_ptr": "*fp32", "out_ptr": "*fp8e4nv", "n_tokens": "i32", "n_heads": "i32",
                  "stride_b": "i32", "stride_l": "i32", "stride_h": "i32", "l_pad": "i32", "D": "constexpr",
                  "BLOCK": "constexpr"}, {"D": d, "BLOCK": block}, pre_warps, 1,
                 ["x_ptr", "scale_ptr", "out_ptr", "stride_b", "stride_l", "stride_h", "l_pad"]))
    for cols in (o["dim"], o["ffn_dim"]):
        block_k = triton.next_power_of_2(cols)
        block_r = max(1, min(16, 4096 // block_k))
        jobs.append(({"kernel": "quantize_rowwise", "cols": cols}, fp8._quantize_rows_kernel,
                     {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "n_rows": "i32", "n_cols": "i32",
                      "x_stride": "i32", "BLOCK_R": "constexpr", "BLOCK_K": "constexpr"},
                     {"BLOCK_R": block_r, "BLOCK_K": block_k}, 4 if block_r * block_k <= 4096 else 8, 1,
                     ["x_ptr", "q_ptr", "n_cols", "x_stride"]))
    for head, fn, sig, consts, warps, stages, div in jobs:
        entry = dict(head)
        try:
            entry.update(_aot(fn, sig, consts, warps, stages, div))
            entry["fits"] = entry["shared"] <= H100_H200_MAX_SHARED
        except Exception as e:  # noqa: BLE001 - a kernel that does not compile is the finding
            entry["error"] = f"{type(e).__name__}: {e}"[:400]
        print(f"[fp8_micro]   {json.dumps(entry)}", flush=True)
        row["kernels"].append(entry)
    return row


def main(argv: list[str] | None = None) -> int:
    t_start = time.perf_counter()
    try:
        o = parse_key_values(sys.argv[1:] if argv is None else argv, DEFAULTS, ("out",))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if o["smoke"]:
        o.update({k: v for k, v in SMOKE.items()})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    benches = (("aot_sm90", aot_report),) if o["aot"] else (("linear", bench_linear), ("attention", bench_attention))
    for name, bench in benches:
        print(f"[fp8_micro] {name} ...", flush=True)
        rows.append(bench(o) if o["aot"] else bench(o, device))
    out = Path(o["out"])
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(report: dict):
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(out)  # the file under its name is always a complete JSON document

    header = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "smoke": bool(o["smoke"]), "sweep": bool(o["sweep"]),
              "command": " ".join(sys.argv)}
    if o["sweep"] and not o["aot"]:
        print("[fp8_micro] attention config sweep ...", flush=True)
        rows.append(sweep_attention(o, device, t_start,
                                    save=lambda r: write({**header, "partial": True, "rows": rows + [r]})))
    report = {**header, "rows": rows, "code_version": code_version(), "provenance": provenance(),
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "wall_s": time.perf_counter() - t_start}
    if o["sweep"] and "best_config" in rows[-1]:
        report["best_config"] = rows[-1]["best_config"]
    write(report)
    for r in rows:
        print(json.dumps(r))
    if "best_config" in report:
        print(f"best attention config ({rows[-1]['best_total_s']:.4f} s): set in kernels/fp8_attention.py\n    "
              f"{rows[-1]['paste']}")
    print(f"wrote {out} ({report['wall_s']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
