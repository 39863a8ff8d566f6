"""Scaling reports: JSON, a markdown table and a PNG plot, our measured rows beside the anchors.

    python -m benchmarks.report out/a14b/scaling.json out/ti2v/scaling.json --out out/combined

(benchmarks.scaling writes <out>/scaling.{json,md,png} itself; this CLI redraws them, or merges several runs into
one markdown file and one figure with a panel per run.)

Rules the output keeps: our rows say "measured (this run)" and carry the GPU name torch reported; anchor rows say
whose figure it is (claim / published, with the source); a figure computed from K timed steps of N carries "†"
and the words "scaled from K of N steps" in the row, under the table and in the plot legend.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path


def _f(v, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}f}" if abs(v) < 1000 else f"{v:.0f}"


def _steps_cell(step: dict) -> str:
    if not step.get("n"):
        return "–"
    return f"{step['median_s']:.3f} [{step['min_s']:.3f}–{step['max_s']:.3f}] (n={step['n']})"


def markdown(report: dict) -> str:
    dag = " †" if report.get("scaled") else ""
    lines = [f"## {report['title']}: {report['model']} {report['size']}, {report['frames']} frames, "
             f"{report['steps']} steps", "",
             f"`{report['command']}` — code {report['code_version']}, {report['created_at']}", ""]
    head = ["source", "GPU", "GPUs", "layout", "text s", "step s median [min–max]", f"denoise s{dag}",
            "VAE decode s", "MP4 write s", f"total s{dag}", "speedup", "efficiency", "TFLOP/s per GPU",
            "peak GPU GB (max rank)", "note"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["rows"]:
        sec = r["seconds"]
        notes = [r["scaled"]] if r.get("scaled") else []
        if r.get("mp4_skipped"):
            notes.append(f"MP4 write not measured: {r['mp4_skipped']}")
        if r.get("placement") == "offload" or r.get("t5_cpu"):
            notes.append(f"placement {r['placement']}, t5_cpu {r['t5_cpu']}")
        if r.get("inject_step_sleep_s"):
            notes.append(f"TEST: {r['inject_step_sleep_s']} s sleep injected per step")
        if r.get("sampler_ran") and not r["sampler_ran"].startswith(f"{r.get('sampler')} "):
            notes.append(f"sampler {r['sampler_ran']}")
        notes.append(f"attention {r.get('attention_backend')}, {'compiled' if r.get('compiled') else 'eager'}")
        notes.append("random weights" if r.get("random_weights") else f"checkpoint {r.get('checkpoint')}")
        lines.append("| " + " | ".join([
            "measured (this run)", r["device_name"], str(r["gpus"]), r["layout"], _f(sec["text_encode"]),
            _steps_cell(r["step"]), _f(sec["denoise"]) + (dag if r.get("scaled") else ""), _f(sec["vae_decode"]),
            _f(sec.get("mp4_write")), _f(sec["total"]) + (dag if r.get("scaled") else ""),
            _f(r.get("speedup")) + ("×" if r.get("speedup") else ""), _f(r.get("efficiency")),
            f"{r['tflops_per_gpu']:.3g}" if r.get("tflops_per_gpu") else "–",
            _f(r.get("peak_gpu_allocated_gb_max"), 1), "; ".join(notes)]) + " |")
    for a in report.get("anchors", []):
        lines.append("| " + " | ".join([
            f"{a['kind']}: {a['source']}", a["gpu"], str(a["gpus"]), "–", "–", "–", "–", "–", "–",
            _f(a["seconds"], 1), _f(_anchor_speedup(report["anchors"], a)), "–", "–", "–",
            a.get("note", "")]) + " |")
    lines.append("")
    if report.get("scaled"):
        lines.append(f"† {report['scaled']}: the render ran {report['timed_steps']} steps of the real "
                     f"{report['steps']}-step schedule (first ceil(K/2), last floor(K/2), so both A14B experts are "
                     f"timed); denoise = median step × {report['steps']}.")
    lines.append("total = text encoding + denoising + VAE decode + MP4 write (model build and warm-up excluded); "
                 "speedup and efficiency against our 1-GPU row of the same run. Anchor rows are other people's "
                 "figures, not measured here (their speedup is against their own 1-GPU row).")
    for f in report.get("failed", []):
        lines.append(f"- FAILED: {f['gpus']} GPU(s) {f['layout']}: {f['error'][:400]} (log {f.get('log')})")
    for s in report.get("skipped", []):
        lines.append(f"- skipped: {s['gpus']} GPU(s) {s['layout']}: {s['why']}")
    return "\n".join(lines) + "\n"


def _anchor_speedup(anchors: list[dict], a: dict):
    base = next((b for b in anchors if b["label"] == a["label"] and b["gpus"] == 1), None)
    return base["seconds"] / a["seconds"] if base and a["gpus"] > 1 else None


def _series(report: dict) -> dict[str, list[dict]]:
    """Our rows by layout family: the 1-GPU row starts every multi-GPU series."""
    rows = report["rows"]
    base = [r for r in rows if r["gpus"] == 1]
    out: dict[str, list[dict]] = {}
    for r in rows:
        if r["gpus"] > 1:
            out.setdefault(r["layout"], list(base)).append(r)
    if not out and base:
        out[base[0]["layout"]] = base
    return out


def plot_panel(ax_t, ax_s, report: dict) -> None:
    scaled = f" ({report['scaled']})" if report.get("scaled") else ""
    for layout, rows in _series(report).items():
        rows = sorted(rows, key=lambda r: r["gpus"])
        gpu = rows[-1]["device_name"]
        xs, ys = [r["gpus"] for r in rows], [r["seconds"]["total"] for r in rows]
        line, = ax_t.plot(xs, ys, "o-", lw=2, label=f"measured: {layout} on {gpu}{scaled}")
        sp = [(r["gpus"], r.get("speedup")) for r in rows if r.get("speedup")]
        if sp:
            ax_s.plot([x for x, _ in sp], [y for _, y in sp], "o-", lw=2, color=line.get_color(),
                      label=f"measured: {layout} on {gpu}")
    labels = dict.fromkeys(a["label"] for a in report.get("anchors", []))
    for label in labels:
        pts = sorted((a for a in report["anchors"] if a["label"] == label), key=lambda a: a["gpus"])
        kind = pts[0]["kind"]
        line, = ax_t.plot([a["gpus"] for a in pts], [a["seconds"] for a in pts], "s--", mfc="none",
                          label=f"{kind}: {label}")
        sp = [(a["gpus"], _anchor_speedup(report["anchors"], a)) for a in pts]
        sp = [(1, 1.0)] + [p for p in sp if p[1]] if any(p[1] for p in sp) else []
        if sp:
            ax_s.plot([x for x, _ in sp], [y for _, y in sp], "s--", mfc="none", color=line.get_color(),
                      label=f"{kind}: {label}")
    allx = sorted({r["gpus"] for r in report["rows"]} | {a["gpus"] for a in report.get("anchors", [])} | {1})
    ax_s.plot(allx, allx, ":", color="gray", label="ideal")
    for ax in (ax_t, ax_s):
        ax.set_xscale("log", base=2)
        ax.set_xticks(allx, [str(x) for x in allx])
        ax.set_xlabel("GPUs")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    ax_t.set_yscale("log")
    ax_s.set_yscale("log", base=2)
    ax_s.set_yticks(allx, [str(x) for x in allx])
    ax_t.set_ylabel("seconds per video" + (" †" if scaled else ""))
    ax_t.set_title(f"{report['model']} {report['size']} {report['frames']}f {report['steps']} steps{scaled}",
                   fontsize=9)
    ax_s.set_ylabel("speedup vs 1 GPU")
    ax_s.set_title("speedup (each series against its own 1-GPU figure)", fontsize=9)


def plot(reports: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # headless: CI and the GPU machines have no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(reports), 2, figsize=(14, 5.5 * len(reports)), squeeze=False)
    for (ax_t, ax_s), rep in zip(axes, reports):
        plot_panel(ax_t, ax_s, rep)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _atomic_text(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_reports(report: dict, out: Path, stem: str) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return [_atomic_text(out / f"{stem}.json", json.dumps(report, indent=1, default=str)),
            _atomic_text(out / f"{stem}.md", markdown(report)),
            plot([report], out / f"{stem}.png")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n")[0])
    ap.add_argument("reports", nargs="+", help="scaling.json files")
    ap.add_argument("--out", required=True, help="folder for combined.md and combined.png")
    args = ap.parse_args(argv)
    reports = [json.loads(Path(p).read_text()) for p in args.reports]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_text(out / "combined.md", "\n".join(markdown(r) for r in reports))
    plot(reports, out / "combined.png")
    print(f"wrote {out / 'combined.md'} and {out / 'combined.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
