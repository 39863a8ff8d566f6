"""The quality cost of a tier: render one shot in exact and in a tier with the same seed and compare.

    python -m benchmarks.quality model=tiny_t2v quality=fast out=out/quality                      # CPU, seconds
    python -m benchmarks.quality model=t2v_a14b random_weights=true quality=draft size=1280*720 out=out/q
    python -m benchmarks.quality model=t2v_a14b checkpoint=/ckpt/Wan2.2-T2V-A14B quality=fast \\
        quality.cache.threshold=0.05 prompt="..." seed=7 out=out/q                  # a studio, on its real weights

Reports the latent relative error ‖z_tier − z_exact‖/‖z_exact‖, frame PSNR and SSIM (benchmarks/metrics.py), the
denoise and total seconds of both renders and the step cache's computed/cached counts, to <out>/quality_<model>_
<tier>.{json,md}. `max_latent_err=`, `min_psnr=`, `min_ssim=` make it exit 1 when a bound is broken (CI).
With random weights the figures are numerical deviation only — not image quality: a studio chooses thresholds by
running this on its own weights and prompts. Arguments are key=value (values parsed as YAML; quality.<field>
overrides the tier): no Hydra, so the same command runs on the GPU machines.
"""
from __future__ import annotations

import gc
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import yaml

from renderer.provenance import code_version, provenance

DEFAULTS = {"model": "tiny_t2v", "quality": "fast", "prompt": "a red kite over a beach at dusk, slow dolly shot",
            "seed": 0, "size": None, "frames": None, "steps": None, "out": "out/quality", "checkpoint": None,
            "random_weights": False, "device": "auto", "dtype": "auto", "attention": None,
            "max_latent_err": None, "min_psnr": None, "min_ssim": None}


def parse_args(argv: list[str]) -> tuple[dict, dict]:
    """key=value pairs -> (options, quality overrides). Unknown keys are an error naming the valid ones."""
    opts, tier = dict(DEFAULTS), {}
    for a in argv:
        key, sep, raw = a.partition("=")
        if not sep:
            raise ValueError(f"argument {a!r}: use key=value (keys: {', '.join(DEFAULTS)}, quality.<field>)")
        value = yaml.safe_load(raw) if raw != "" else None
        if key.startswith("quality."):
            node = tier
            *parents, leaf = key.split(".")[1:]
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        elif key in DEFAULTS:
            opts[key] = raw if key in ("prompt", "size", "out", "checkpoint", "model", "quality") else value
        else:
            raise ValueError(f"unknown argument {key!r}: use {', '.join(DEFAULTS)} or quality.<field>")
    return opts, tier


def render_once(preset, tier, opts: dict):
    """One render with a fresh Pipeline (weights from the checkpoint, or drawn from the preset's seed)."""
    from kernels.settings import KernelSettings
    from renderer.pipeline import Pipeline, RenderOptions, ShotSpec

    precision = {"auto": "auto", "bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}[str(opts["dtype"])]
    kernels = KernelSettings(attention=opts["attention"] or "auto", precision=precision)  # the tier adds its own
    options = RenderOptions(device=opts["device"], kernels=kernels, progress=True,
                            random_weights=bool(opts["random_weights"]))
    pipe = Pipeline(preset, checkpoint=preset.checkpoint, options=options, tier=tier)
    shot = ShotSpec(prompt=opts["prompt"], seed=int(opts["seed"]), size=opts["size"], frames=opts["frames"],
                    steps=opts["steps"], shot_id=f"quality_{tier.name}")
    t0 = time.perf_counter()
    result = pipe.render(shot, keep_latent=True)
    total = time.perf_counter() - t0
    info = {"quality": tier.name, "tier": tier.describe(), "steps": result.shot.steps, "sampler": result.shot.sampler,
            "seconds": {**{k: round(v, 4) for k, v in result.timings.items()}, "total": round(total, 4)},
            "step_seconds": [round(s, 4) for s in result.step_seconds], "experts_used": result.experts_used,
            **pipe.cache_report(), "device": str(pipe.device)}
    del pipe
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result, info


def compare(opts: dict, tier_overrides: dict) -> dict:
    from benchmarks.metrics import latent_rel_error, psnr, ssim
    from renderer.presets import load_preset
    from renderer.tiers import load_tier

    preset = load_preset(opts["model"])
    if opts["checkpoint"]:
        preset = replace(preset, checkpoint=str(opts["checkpoint"]))
    tier = load_tier(opts["quality"], tier_overrides)
    exact = load_tier("exact")
    ref, ref_info = render_once(preset, exact, opts)
    got, got_info = render_once(preset, tier, opts)
    report = {
        "model": preset.name, "checkpoint": preset.checkpoint, "random_weights": preset.checkpoint is None,
        "quality": tier.name, "seed": int(opts["seed"]), "prompt": opts["prompt"],
        "size": ref.shot.size, "frames": ref.shot.frames,
        "latent_rel_err": latent_rel_error(got.latent, ref.latent),
        "psnr_db": psnr(got.frames, ref.frames), "ssim": ssim(got.frames, ref.frames),
        "speedup_denoise": ref.timings["denoise"] / max(got.timings["denoise"], 1e-9),
        "speedup_total": ref_info["seconds"]["total"] / max(got_info["seconds"]["total"], 1e-9),
        "exact": ref_info, "tier": got_info,
        "note": ("random weights: the figures are numerical deviation only, not image quality"
                 if preset.checkpoint is None else "real weights: deviation of the tier from exact on this shot"),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "code_version": code_version(), "provenance": provenance(),
        "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    return report


def write_report(report: dict, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"quality_{report['model']}_{report['quality']}"
    js, md = stem.with_suffix(".json"), stem.with_suffix(".md")
    js.write_text(json.dumps(report, indent=1, default=str))
    e, t = report["exact"], report["tier"]
    cached = sum(c["cached"] for c in t["step_cache"])
    lines = [f"## {report['model']} {report['size']} {report['frames']} frames: {report['quality']} vs exact "
             f"(seed {report['seed']})", "",
             "| render | steps | sampler | denoise s | total s | cached forwards |", "|---|---|---|---|---|---|",
             f"| exact | {e['steps']} | {e['sampler']} | {e['seconds']['denoise']:.2f} | {e['seconds']['total']:.2f} | – |",
             f"| {report['quality']} | {t['steps']} | {t['sampler']} | {t['seconds']['denoise']:.2f} | "
             f"{t['seconds']['total']:.2f} | {cached} |", "",
             f"latent relative error {report['latent_rel_err']:.4g}; PSNR {report['psnr_db']:.2f} dB; "
             f"SSIM {report['ssim']:.4f}; speedup {report['speedup_denoise']:.2f}× denoise, "
             f"{report['speedup_total']:.2f}× total.", "", f"_{report['note']}._", ""]
    md.write_text("\n".join(lines))
    return js, md


def check_bounds(report: dict, opts: dict) -> list[str]:
    broken = []
    if opts["max_latent_err"] is not None and not report["latent_rel_err"] <= float(opts["max_latent_err"]):
        broken.append(f"latent relative error {report['latent_rel_err']:.4g} > {opts['max_latent_err']}")
    if opts["min_psnr"] is not None and not report["psnr_db"] >= float(opts["min_psnr"]):
        broken.append(f"PSNR {report['psnr_db']:.2f} dB < {opts['min_psnr']}")
    if opts["min_ssim"] is not None and not report["ssim"] >= float(opts["min_ssim"]):
        broken.append(f"SSIM {report['ssim']:.4f} < {opts['min_ssim']}")
    return broken


def main(argv: list[str] | None = None) -> int:
    from renderer.tiers import TierError

    try:
        opts, overrides = parse_args(list(sys.argv[1:] if argv is None else argv))
        report = compare(opts, overrides)
    except (ValueError, TierError) as e:  # bad arguments or tier fields: the message, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    js, md = write_report(report, Path(opts["out"]))
    print(md.read_text())
    print(f"wrote {js} and {md}")
    broken = check_bounds(report, opts)
    for b in broken:
        print(f"bound broken: {b}", file=sys.stderr)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
