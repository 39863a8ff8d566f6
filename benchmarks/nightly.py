"""The nightly benchmark: a fixed manifest of scaling benchmarks, a history file, a trend plot, regression flags.

    python -m benchmarks.nightly                                        # benchmarks/nightly_manifest.yaml, embedded Ray
    python -m benchmarks.nightly manifest=my.yaml margin=0.05 address=10.0.0.5:6379

Every benchmark of the manifest is one `python -m benchmarks.scaling bench=NAME <overrides>` run inside a Ray task
(the embedded local cluster by default, like the render farm; `address=` joins a running one), one after another:
benchmarks sharing GPUs would slow each other down. Each measured row becomes one line of the history file (JSONL:
commit, date, device, figures). A figure regresses when it is worse than the median of the last `window` runs of
the same row (same benchmark, GPUs, layout, device, scaling) by more than `margin` (per benchmark if it sets
one). The trend plot is redrawn every night; the exit status is 1 when anything regressed or failed, with the list
printed, else 0.

Settings (key=value on the command line, YAML values; the manifest's own top-level keys give the defaults):
  manifest, history, plot, out, margin, window, address, num_cpus, num_gpus, inject_step_sleep_s (test hook).
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from renderer.provenance import code_version, provenance

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MANIFEST = ROOT / "benchmarks" / "nightly_manifest.yaml"
# figure -> direction: +1 lower is better (seconds, memory), -1 higher is better (throughput)
FIGURES = {"total_s": 1, "step_median_s": 1, "denoise_s": 1, "text_encode_s": 1, "vae_decode_s": 1,
           "peak_gpu_gb": 1, "tflops_per_gpu": -1}
DEFAULTS = {"history": "out/nightly/history.jsonl", "plot": "out/nightly/trend.png", "out": "out/nightly/runs",
            "margin": 0.10, "window": 5, "figures": ["total_s", "step_median_s"], "address": None,
            "num_cpus": None, "num_gpus": None, "inject_step_sleep_s": 0}


class NightlyError(ValueError):
    pass


def load_settings(argv: list[str]) -> dict:
    over = {}
    for a in argv:
        key, sep, value = a.partition("=")
        if not sep:
            raise NightlyError(f"argument {a!r} is not key=value")
        over[key] = yaml.safe_load(value) if value != "" else None
    path = Path(over.get("manifest") or DEFAULT_MANIFEST)
    if not path.is_file():
        raise NightlyError(f"no nightly manifest at {path}")
    manifest = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(over) - set(DEFAULTS) - {"manifest"})
    if unknown:
        raise NightlyError(f"unknown setting(s) {', '.join(unknown)}: use {', '.join(sorted(DEFAULTS))}, manifest")
    s = {**DEFAULTS, **{k: v for k, v in manifest.items() if k != "benchmarks"}, **over, "manifest": str(path)}
    s["benchmarks"] = validate_benchmarks(manifest.get("benchmarks"), s)
    return s


def validate_benchmarks(items: Any, s: dict) -> list[dict]:
    problems, out = [], []
    if not isinstance(items, list) or not items:
        raise NightlyError("the manifest needs a non-empty `benchmarks:` list")
    for i, b in enumerate(items):
        if not isinstance(b, dict) or not b.get("name") or not b.get("bench"):
            problems.append(f"benchmarks[{i}]: needs `name` and `bench` (a conf/bench config name)")
            continue
        if not (ROOT / "conf" / "bench" / f"{b['bench']}.yaml").is_file():
            problems.append(f"benchmarks[{i}] {b['name']}: no conf/bench/{b['bench']}.yaml")
        if not isinstance(b.get("overrides", []), list):
            problems.append(f"benchmarks[{i}] {b['name']}: overrides must be a list of key=value strings")
        else:
            try:  # composed now, so a bad override fails before Ray starts; gives the GPU count to reserve
                from benchmarks.scaling import load_config

                cfg = load_config(b["bench"], [str(o) for o in b.get("overrides", [])])
                b = {**b, "gpus_needed": max(int(g) for g in cfg["gpus"]),
                     "tiny": cfg["model"].get("text_encoder") == "tiny"}
            except Exception as e:
                problems.append(f"benchmarks[{i}] {b['name']}: {e}")
        out.append({"overrides": [], "margin": s["margin"], **b})
    names = [b["name"] for b in out]
    problems += [f"benchmark name {n!r} is used twice" for n in sorted({n for n in names if names.count(n) > 1})]
    for f in s["figures"]:
        if f not in FIGURES:
            problems.append(f"figure {f!r} unknown: choose from {', '.join(FIGURES)}")
    if problems:
        raise NightlyError("; ".join(problems))
    return out


def bench_command(b: dict, out: Path, sleep_s: float) -> list[str]:
    cmd = [sys.executable, "-m", "benchmarks.scaling", f"bench={b['bench']}", *map(str, b["overrides"]),
           f"out={out}"]
    if sleep_s:
        cmd.append(f"inject_step_sleep_s={sleep_s}")
    return cmd


def run_benchmark(cmd: list[str], out: str, timeout_s: float) -> dict:
    """Runs in a Ray task: the scaling benchmark as a subprocess (it starts torchrun itself)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        rc, tail = p.returncode, (p.stdout + p.stderr)[-3000:]
    except subprocess.TimeoutExpired:
        rc, tail = -1, f"timed out after {timeout_s:.0f} s"
    report = Path(out) / "scaling.json"
    return {"rc": rc, "tail": tail, "report": json.loads(report.read_text()) if report.is_file() else None}


# -- history ------------------------------------------------------------------------------------------------------
def row_key(bench_name: str, row: dict) -> str:
    return " | ".join(str(x) for x in (bench_name, row["model"], row["size"], row["frames"], f"{row['gpus']} GPU",
                                       row["layout"], row["device_name"], row.get("scaled") or "full schedule"))


def record(bench_name: str, row: dict, run: dict) -> dict:
    sec = row["seconds"]
    figures = {"total_s": sec["total"], "step_median_s": row["step"]["median_s"], "denoise_s": sec["denoise"],
               "text_encode_s": sec["text_encode"], "vae_decode_s": sec["vae_decode"],
               "peak_gpu_gb": row.get("peak_gpu_allocated_gb_max"), "tflops_per_gpu": row.get("tflops_per_gpu")}
    return {"run_id": run["run_id"], "date": run["date"], "commit": run["commit"], "benchmark": bench_name,
            "key": row_key(bench_name, row), "device": row["device_name"], "gpus": row["gpus"],
            "layout": row["layout"], "scaled": row.get("scaled"),
            "inject_step_sleep_s": row.get("inject_step_sleep_s") or 0, "sampler_ran": row.get("sampler_ran"),
            "code_version": run.get("code_version"), "figures": figures}


def read_history(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash must not stop every later night
                logging.getLogger("wanrender.nightly").warning("history %s line %d unreadable, skipped", path, n)
    return out


def append_history(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, default=str) + "\n")


def regressions(records: list[dict], history: list[dict], figures: list[str], margins: dict[str, float],
                window: int) -> list[dict]:
    """Figures of `records` worse than the median of the same row's last `window` history entries by more than
    that benchmark's margin (margins: benchmark name -> fraction, 0.10 = 10 %)."""
    found = []
    for rec in records:
        # runs with a planted sleep (the tests' hook) never become anyone's baseline
        past = [h for h in history if h["key"] == rec["key"] and not h.get("inject_step_sleep_s")][-window:]
        margin = margins.get(rec["benchmark"], 0.10)
        for f in figures:
            now = rec["figures"].get(f)
            vals = [h["figures"].get(f) for h in past if h["figures"].get(f) is not None]
            if now is None or not vals:
                continue
            med = statistics.median(vals)
            if med <= 0:
                continue
            worse = (now - med) / med * FIGURES[f]  # > 0: worse, as a fraction of the median
            if worse > margin:
                found.append({"key": rec["key"], "figure": f, "now": now, "median": med, "runs": len(vals),
                              "worse_by": worse, "margin": margin})
    return found


# -- trend plot ---------------------------------------------------------------------------------------------------
def plot_trend(history: list[dict], figures: list[str], path: Path, flagged: list[dict] = ()) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(dict.fromkeys(h["run_id"] for h in history))
    dates = {h["run_id"]: f"{h['date'][:10]}\n{h['commit'][:8]}" for h in history}
    fig, axes = plt.subplots(len(figures), 1, figsize=(12, 4 * len(figures)), squeeze=False)
    bad = {(b["key"], b["figure"]) for b in flagged}
    for ax, f in zip(axes[:, 0], figures):
        for key in dict.fromkeys(h["key"] for h in history):
            pts = [(runs.index(h["run_id"]), h["figures"].get(f)) for h in history if h["key"] == key]
            pts = [p for p in pts if p[1] is not None]
            if not pts:
                continue
            line, = ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", label=key)
            if (key, f) in bad:
                ax.plot([pts[-1][0]], [pts[-1][1]], "x", ms=14, mew=3, color="red")
        ax.set_ylabel(f)
        ax.set_xticks(range(len(runs)), [dates[r] for r in runs], fontsize=7)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6)
        ax.set_title(f"nightly {f} (red x: regression vs the median of earlier runs; scaled rows say so in the key)",
                     fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# -- the job ------------------------------------------------------------------------------------------------------
def _commit() -> str:
    """The commit the code ran at, "-dirty" when tracked files differ from it (renderer/provenance.py: git, or the
    stamp on a machine without .git); "src.<digest>" of the source files when neither says which commit."""
    p = provenance()
    if p["commit"] is None:
        return f"src.{p['digest']}"
    return p["commit"] + ("-dirty" if p["dirty"] else "")


def run_nightly(s: dict) -> int:
    import ray

    run = {"run_id": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{os.getpid()}",
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": _commit(),
           "code_version": code_version()}
    history_path, out_root = Path(s["history"]), Path(s["out"]) / run["run_id"]
    history = read_history(history_path)
    started = not ray.is_initialized()  # reuse a Ray already up in this process (tests); else start or join one
    if started:
        ray.init(address=s["address"] or "local", num_cpus=s["num_cpus"] if not s["address"] else None,
                 num_gpus=s["num_gpus"] if not s["address"] else None, include_dashboard=False,
                 log_to_driver=False, logging_level=logging.WARNING)
    task = ray.remote(run_benchmark)
    records, failures = [], []
    try:
        gpus_here = int(ray.cluster_resources().get("GPU", 0))
        for b in s["benchmarks"]:
            if not gpus_here and not b.get("tiny"):
                print(f"[nightly] {b['name']}: skipped, a full-size model needs GPUs and the cluster has none")
                continue
            # rows needing more GPUs than the cluster has are skipped by the benchmark itself (and listed)
            need = min(int(b.get("gpus_needed", 1)), gpus_here)
            out = out_root / b["name"]
            cmd = bench_command(b, out, float(s.get("inject_step_sleep_s") or 0))
            print(f"[nightly {time.strftime('%H:%M:%S')}] {b['name']}: {' '.join(cmd[1:])}", flush=True)
            opts = {"num_gpus": need} if gpus_here else {"num_cpus": 1}
            res = ray.get(task.options(**opts).remote(cmd, str(out), float(b.get("timeout_s", 3600))))
            rep = res["report"]
            if res["rc"] != 0 or rep is None:
                failures.append(f"{b['name']}: benchmark exit status {res['rc']}: {res['tail'][-800:]}")
            for row in (rep or {}).get("rows", []):
                records.append(record(b["name"], row, run))
    finally:
        if started:
            ray.shutdown()
    margins = {b["name"]: float(b["margin"]) for b in s["benchmarks"]}
    flagged = regressions(records, history, list(s["figures"]), margins, int(s["window"]))
    append_history(history_path, records)
    plot = plot_trend(history + records, list(s["figures"]), Path(s["plot"]), flagged)
    print(f"[nightly] {len(records)} rows appended to {history_path}; trend plot {plot}")
    for r in flagged:
        print(f"REGRESSION {r['key']}: {r['figure']} {r['now']:.4g} vs median {r['median']:.4g} of the last "
              f"{r['runs']} runs (worse by {r['worse_by']:.0%}, margin {r['margin']:.0%})")
    for f in failures:
        print(f"FAILED {f}")
    if not records and not failures:
        print("[nightly] nothing was measured (every benchmark skipped)")
    return 1 if flagged or failures else 0


def main(argv: list[str] | None = None) -> int:
    try:
        s = load_settings(list(sys.argv[1:] if argv is None else argv))
    except NightlyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run_nightly(s)


if __name__ == "__main__":
    sys.exit(main())
