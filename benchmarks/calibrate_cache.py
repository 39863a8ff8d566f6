"""Record a step-cache schedule from one exact render (MagCache-style calibration, for real weights).

    python -m benchmarks.calibrate_cache model=t2v_a14b checkpoint=/ckpt/Wan2.2-T2V-A14B prompt="..." \\
        threshold=0.15 out=schedules/t2v_a14b_720p.json
    wanrender generate ... quality=fast quality.cache.method=schedule quality.cache.schedule=schedules/t2v_a14b_720p.json

The exact render runs with a step cache at threshold 0 on every expert (it never skips, so the render is the
exact one bit for bit) that records each step's first-block residual change (renderer/cache.py); the change is
accumulated from the last computed step and a step is cached while the sum stays under `threshold`
(renderer.cache.schedule_from_metrics). The JSON holds the schedule per expert, the metrics it came from and the
settings it is valid for (model, size, frames, steps, sampler, shift); every rank reading it takes the same
decisions. Arguments are key=value like benchmarks.quality (no Hydra needed).
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from renderer.kvargs import parse_key_values

DEFAULTS = {"model": "tiny_t2v", "checkpoint": None, "random_weights": False, "prompt": "a red kite over a beach",
            "seed": 0, "size": None, "frames": None, "steps": None, "threshold": 0.1, "warmup": 1, "max_skips": 2,
            "device": "auto", "dtype": "auto", "out": "out/cache_schedule.json"}


def calibrate(opts: dict) -> dict:
    from renderer.cache import StepCache, schedule_from_metrics, step_metrics
    from renderer.output import code_version
    from renderer.pipeline import Pipeline, RenderOptions, ShotSpec
    from renderer.presets import load_preset

    preset = load_preset(opts["model"])
    if opts["checkpoint"]:
        preset = replace(preset, checkpoint=str(opts["checkpoint"]))
    from kernels.settings import KernelSettings

    options = RenderOptions(device=opts["device"], kernels=KernelSettings(precision=str(opts["dtype"])),
                            random_weights=bool(opts["random_weights"]))
    pipe = Pipeline(preset, checkpoint=preset.checkpoint, options=options)
    recorders = [StepCache(m, "fbcache", threshold=0.0).install() for m in pipe.experts]
    shot = ShotSpec(prompt=str(opts["prompt"]), seed=int(opts["seed"]), size=opts["size"], frames=opts["frames"],
                    steps=opts["steps"], shot_id="calibration")
    t0 = time.perf_counter()
    result = pipe.render(shot)
    metrics = [step_metrics(r.stats) for r in recorders]
    threshold, warmup, max_skips = float(opts["threshold"]), int(opts["warmup"]), int(opts["max_skips"])
    schedule = [schedule_from_metrics(m, threshold, warmup, max_skips) for m in metrics]
    s = result.shot
    return {"experts": schedule, "metrics": [[None if v == float("inf") else v for v in m] for m in metrics],
            "threshold": threshold, "warmup": warmup, "max_skips": max_skips,
            "valid_for": {"model": preset.name, "checkpoint": preset.checkpoint, "size": s.size, "frames": s.frames,
                          "steps": s.steps, "sampler": s.sampler, "shift": s.shift},
            "cached_steps": [sum(x) for x in schedule], "steps_per_expert": [len(m) for m in metrics],
            "render_seconds": round(time.perf_counter() - t0, 3), "code_version": code_version(),
            "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def main(argv: list[str] | None = None) -> int:
    try:
        opts = parse_key_values(sys.argv[1:] if argv is None else argv, DEFAULTS,
                                ("prompt", "size", "out", "checkpoint", "model"))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        data = calibrate(opts)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(opts["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(out)  # atomic: a schedule file is complete or absent
    print(f"wrote {out}: cached steps per expert {data['cached_steps']} of {data['steps_per_expert']} "
          f"(threshold {data['threshold']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
