"""Step-cache schedules from published calibrations (MagCache), for shots and benchmarks without real weights.

MagCache (Ma et al., "MagCache: Fast Video Generation with Magnitude-Aware Cache", arXiv:2506.09045; calibration
data for Wan2.2 in github:Zehong-Ma/MagCache, MagCache4Wan2.2, also proposed to Wan2.2 as PR #70) observes that the
ratio of the residual's magnitude between consecutive steps, γ_t = ‖r_t‖ / ‖r_{t−1}‖, is nearly the same curve for
every prompt of a model. So it is measured once (the published `mag_ratios`, one value per DiT call: cond and uncond
of each step, interleaved) and the skip decisions follow from the curve alone — no runtime metric, so every rank of a
render group takes the same decisions by construction, and the decisions at random weights are those of the real
weights the curve was measured on. That is what makes it usable for our random-weight benchmark rows.

The rule, per branch (cond / uncond), over the calls of one shot in order:
  - protected calls always run in full: the first `retention` share of each expert's calls (t2v A14B), the whole
    high-noise expert and the first `retention` share of the low-noise one (i2v A14B), the first `retention` share
    of all calls (TI2V-5B, one model);
  - otherwise the branch multiplies up the ratios since its last full call (Γ = Π γ), adds |1 − Γ| to an
    accumulated error, and is served from the cache while that error stays under `threshold` and at most `max_skips`
    calls in a row were cached; else it runs in full and the accumulators restart.
A step count other than the calibration's is served by nearest-neighbour resampling of each branch's curve (the
authors' choice). Our StepCache decides per step and expert, for both branches together: a step is cached only when
both branches would be (conservative: never more skipped than MagCache itself). A cached step still runs the first
block (renderer/cache.py), 1/40 of a forward on A14B.

The ratio tables below are measurement data published by the MagCache authors (Wan2.2 T2V-A14B and I2V-A14B at 40
steps, TI2V-5B at 50 steps, text-only and image-conditioned), not code; the leading call pair is 1.0 (no previous
residual) and is not stored.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

PUBLISHED_MAG_RATIOS: dict[str, tuple[float, ...]] = {
    't2v_a14b': (
        1.00124, 1.00155, 0.99822, 0.99851, 0.99696, 0.99687, 0.99703, 0.99732, 0.9966, 0.99679, 0.99602, 0.99658,
        0.99578, 0.99664, 0.99484, 0.9949, 0.99633, 0.996, 0.99659, 0.99683, 0.99534, 0.99549, 0.99584, 0.99577,
        0.99681, 0.99694, 0.99563, 0.99554, 0.9944, 0.99473, 0.99594, 0.9964, 0.99466, 0.99461, 0.99453, 0.99481,
        0.99389, 0.99365, 0.99391, 0.99406, 0.99354, 0.99361, 0.99283, 0.99278, 0.99268, 0.99263, 0.99057, 0.99091,
        0.99125, 0.99126, 0.65523, 0.65252, 0.98808, 0.98852, 0.98765, 0.98736, 0.9851, 0.98535, 0.98311, 0.98339,
        0.9805, 0.9806, 0.97776, 0.97771, 0.97278, 0.97286, 0.96731, 0.96728, 0.95857, 0.95855, 0.94385, 0.94385,
        0.92118, 0.921, 0.88108, 0.88076, 0.80263, 0.80181),
    'ti2v_5b_t2v': (
        0.99505, 0.99389, 0.99441, 0.9957, 0.99558, 0.99551, 0.99499, 0.9945, 0.99534, 0.99548, 0.99468, 0.9946,
        0.99463, 0.99458, 0.9946, 0.99453, 0.99408, 0.99404, 0.9945, 0.99441, 0.99409, 0.99398, 0.99403, 0.99397,
        0.99382, 0.99377, 0.99349, 0.99343, 0.99377, 0.99378, 0.9933, 0.99328, 0.99303, 0.99301, 0.99217, 0.99216,
        0.992, 0.99201, 0.99201, 0.99202, 0.99133, 0.99132, 0.99112, 0.9911, 0.99155, 0.99155, 0.98958, 0.98957,
        0.98959, 0.98958, 0.98838, 0.98835, 0.98826, 0.98825, 0.9883, 0.98828, 0.98711, 0.98709, 0.98562, 0.98561,
        0.98511, 0.9851, 0.98414, 0.98412, 0.98284, 0.98282, 0.98104, 0.98101, 0.97981, 0.97979, 0.97849, 0.97849,
        0.97557, 0.97554, 0.97398, 0.97395, 0.97171, 0.97166, 0.96917, 0.96913, 0.96511, 0.96507, 0.96263, 0.96257,
        0.95839, 0.95835, 0.95483, 0.95475, 0.94942, 0.94936, 0.9468, 0.94678, 0.94583, 0.94594, 0.94843, 0.94872,
        0.96949, 0.97015),
    'ti2v_5b_i2v': (
        0.99512, 0.99559, 0.99559, 0.99561, 0.99595, 0.99577, 0.99512, 0.99512, 0.99546, 0.99534, 0.99543, 0.99531,
        0.99496, 0.99491, 0.99504, 0.99499, 0.99444, 0.99449, 0.99481, 0.99481, 0.99435, 0.99435, 0.9943, 0.99431,
        0.99411, 0.99406, 0.99373, 0.99376, 0.99413, 0.99405, 0.99363, 0.99359, 0.99335, 0.99331, 0.99244, 0.99243,
        0.99229, 0.99229, 0.99239, 0.99236, 0.99163, 0.9916, 0.99149, 0.99151, 0.99191, 0.99192, 0.9898, 0.98981,
        0.9899, 0.98987, 0.98849, 0.98849, 0.98846, 0.98846, 0.98861, 0.98861, 0.9874, 0.98738, 0.98588, 0.98589,
        0.98539, 0.98534, 0.98444, 0.98439, 0.9831, 0.98309, 0.98119, 0.98118, 0.98001, 0.98, 0.97862, 0.97859, 0.97555,
        0.97558, 0.97392, 0.97388, 0.97152, 0.97145, 0.96871, 0.9687, 0.96435, 0.96434, 0.96129, 0.96127, 0.95639,
        0.95638, 0.95176, 0.95175, 0.94446, 0.94452, 0.93972, 0.93974, 0.93575, 0.9359, 0.93537, 0.93552, 0.96655,
        0.96616),
    'i2v_a14b': (
        0.99191, 0.99144, 0.99356, 0.99337, 0.99326, 0.99285, 0.99251, 0.99264, 0.99393, 0.99366, 0.9943, 0.9943,
        0.99276, 0.99288, 0.99389, 0.99393, 0.99274, 0.99289, 0.99316, 0.9931, 0.99379, 0.99377, 0.99268, 0.99271,
        0.99222, 0.99227, 0.99175, 0.9916, 0.91076, 0.91046, 0.98931, 0.98933, 0.99087, 0.99088, 0.98852, 0.98855,
        0.98895, 0.98896, 0.98806, 0.98808, 0.9871, 0.98711, 0.98613, 0.98618, 0.98434, 0.98435, 0.983, 0.98307,
        0.98185, 0.98187, 0.98131, 0.98131, 0.9783, 0.97835, 0.97619, 0.9762, 0.97264, 0.9727, 0.97088, 0.97098,
        0.96568, 0.9658, 0.96045, 0.96055, 0.95322, 0.95335, 0.94579, 0.94594, 0.93297, 0.93311, 0.91699, 0.9172,
        0.89174, 0.89202, 0.8541, 0.85446, 0.79823, 0.79902),
}

# the authors' settings for Wan2.2 (MagCache4Wan2.2 README usage lines): threshold 0.06, at most 2 cached calls in a
# row; retention 0.4 for T2V-A14B, 0.1 for I2V-A14B, 0.2 for TI2V-5B
PUBLISHED_SETTINGS = {"t2v_a14b": {"threshold": 0.06, "max_skips": 2, "retention": 0.4},
                      "i2v_a14b": {"threshold": 0.06, "max_skips": 2, "retention": 0.1},
                      "ti2v_5b": {"threshold": 0.06, "max_skips": 2, "retention": 0.2}}


def has_published_calibration(model: str) -> bool:
    """Whether the model preset has a published MagCache ratio table (the Wan2.2 T2V-A14B, I2V-A14B, TI2V-5B)."""
    return model in PUBLISHED_SETTINGS


def ratio_table(model: str, image: bool = False) -> tuple[float, ...]:
    """The published per-call ratios for a model preset name (ti2v_5b: text-only or image-conditioned)."""
    key = f"{model}_{'i2v' if image else 't2v'}" if model == "ti2v_5b" else model
    if key not in PUBLISHED_MAG_RATIOS:
        raise ValueError(f"no published MagCache calibration for model {model!r} (have: t2v_a14b, i2v_a14b, ti2v_5b): "
                         f"use quality.cache.method=fbcache, or record a schedule with python -m "
                         f"benchmarks.calibrate_cache")
    return PUBLISHED_MAG_RATIOS[key]


def per_call_ratios(table: tuple[float, ...], steps: int) -> np.ndarray:
    """[2·steps] ratios, cond and uncond interleaved: the table with its leading (1, 1) pair, each branch's curve
    resampled to `steps` by nearest neighbour when the calibration had another step count."""
    full = np.array([1.0, 1.0, *table], dtype=np.float64)  # [2·S_cal]
    if len(full) % 2:
        raise ValueError(f"a MagCache ratio table holds cond/uncond pairs; got {len(full)} values")
    if len(full) == 2 * steps:
        return full
    out = np.empty(2 * steps, dtype=np.float64)
    for branch in (0, 1):
        curve = full[branch::2]  # [S_cal]
        idx = [len(curve) - 1] if steps == 1 else np.round(np.arange(steps) * (len(curve) - 1) / (steps - 1)).astype(int)
        out[branch::2] = curve[idx]
    return out


def _protected(call: int, n_calls: int, split: int | None, mode: str, retention: float) -> bool:
    """Whether a call always runs in full (see the module docstring); split = 2·(high-noise steps) or None."""
    if split is None:  # one model (TI2V-5B)
        return call < int(n_calls * retention)
    if mode == "i2v":
        return call < int(split + (n_calls - split) * retention)
    return call < int(split * retention) or split <= call <= (n_calls - split) * retention + split


def magcache_calls(ratios: np.ndarray, split: int | None, mode: str, threshold: float, max_skips: int,
                   retention: float) -> list[bool]:
    """Per DiT call (cond, uncond interleaved): True = served from the cache."""
    n = len(ratios)
    gamma, err, run = [1.0, 1.0], [0.0, 0.0], [0, 0]
    cached = []
    for call in range(n):
        b = call % 2
        if _protected(call, n, split, mode, retention):
            cached.append(False)
            continue
        gamma[b] *= float(ratios[call])
        run[b] += 1
        err[b] += abs(1.0 - gamma[b])
        if err[b] < threshold and run[b] <= max_skips:
            cached.append(True)
        else:
            gamma[b], err[b], run[b] = 1.0, 0.0, 0
            cached.append(False)
    return cached


def high_noise_steps(steps: int, shift: float, boundary: float | None) -> int | None:
    """Steps whose timestep is at or above boundary·1000 (the high-noise expert's), on the shot's sampling grid."""
    if boundary is None:
        return None
    from renderer.sampling import build_schedule

    _, timesteps = build_schedule(steps, shift)
    return int(sum(1 for t in timesteps.tolist() if t >= boundary * 1000))


def magcache_schedule(model: str, steps: int, shift: float, boundary: float | None, threshold: float | None = None,
                      max_skips: int | None = None, retention: float | None = None, image: bool = False) -> dict:
    """The StepCache schedule file's content (renderer/cache.py load_schedule): per expert, per step, cached or not."""
    settings = dict(PUBLISHED_SETTINGS.get(model, PUBLISHED_SETTINGS["t2v_a14b"]))
    for key, val in (("threshold", threshold), ("max_skips", max_skips), ("retention", retention)):
        if val is not None:
            settings[key] = val
    if not (settings["threshold"] >= 0 and math.isfinite(settings["threshold"])):
        raise ValueError(f"magcache threshold must be a finite number ≥ 0, got {settings['threshold']}")
    if not 0.0 <= settings["retention"] <= 1.0:
        raise ValueError(f"magcache retention must lie in [0, 1], got {settings['retention']}")
    if int(settings["max_skips"]) < 0:
        raise ValueError(f"magcache max_skips must be ≥ 0, got {settings['max_skips']}")
    ratios = per_call_ratios(ratio_table(model, image), steps)
    high = high_noise_steps(steps, shift, boundary)
    mode = "i2v" if model == "i2v_a14b" else "t2v"
    calls = magcache_calls(ratios, None if high is None else 2 * high, mode, float(settings["threshold"]),
                           int(settings["max_skips"]), float(settings["retention"]))
    per_step = [calls[2 * s] and calls[2 * s + 1] for s in range(steps)]  # both branches, or neither
    experts = [per_step] if high is None else [per_step[:high], per_step[high:]]
    for steps_of_expert in experts:  # our caches start empty per expert (MagCache shares one residual across both)
        if steps_of_expert:
            steps_of_expert[0] = False
    per_step = [c for e in experts for c in e]
    return {"method": "magcache (published calibration)", "model": model, "image": bool(image), "steps": steps,
            "shift": shift, "boundary": boundary, "high_noise_steps": high, **settings,
            "experts": experts, "cached_steps": sum(per_step), "computed_steps": steps - sum(per_step),
            "source": "MagCache (arXiv:2506.09045), ratios from github:Zehong-Ma/MagCache MagCache4Wan2.2"}


# the command line's keys; boundary "preset": the model preset's own (null: one model, no expert switch)
CLI_DEFAULTS = {"model": "t2v_a14b", "steps": None, "shift": None, "boundary": "preset", "threshold": None,
                "max_skips": None, "retention": None, "image": False, "out": None}


def main(argv: list[str] | None = None) -> int:
    """python -m renderer.cache_schedules model=t2v_a14b [steps=40 shift=12 boundary=0.875 threshold=0.06
    max_skips=2 retention=0.4 image=false] out=schedules/t2v_a14b_magcache.json"""
    from renderer.kvargs import parse_key_values
    from renderer.presets import load_preset

    try:
        opts = parse_key_values(sys.argv[1:] if argv is None else argv, CLI_DEFAULTS, ("model", "out"))
        preset = load_preset(opts["model"])
        sched = magcache_schedule(opts["model"], int(opts["steps"] or preset.steps),
                                  float(opts["shift"] or preset.shift),
                                  preset.boundary if opts["boundary"] == "preset" else opts["boundary"],
                                  opts["threshold"], opts["max_skips"], opts["retention"], bool(opts["image"]))
    except (ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(sched, indent=1)
    if opts["out"]:
        out = Path(opts["out"])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}: {sched['cached_steps']} of {sched['steps']} steps cached")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
