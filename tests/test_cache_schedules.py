"""MagCache schedules from the published calibration (renderer/cache_schedules.py).

The reference is a transcription of the decision logic of MagCache's Wan2.2 forward (github:Zehong-Ma/MagCache,
MagCache4Wan2.2/magcache_generate.py: one call counter over both experts, per-branch accumulators, the retention
window at the start of each expert), written the way that code is structured — a call counter and three per-branch
lists — so a slip in our per-call rewrite shows up as a different decision."""
import json
import subprocess
import sys

import numpy as np
import pytest

from renderer.cache import load_schedule
from renderer.cache_schedules import (PUBLISHED_MAG_RATIOS, high_noise_steps, magcache_calls, magcache_schedule,
                                      per_call_ratios)


def _official_decisions(mag_ratios, num_steps, split_step, mode, thresh, K, retention):
    """Skip (True) per call, as MagCache4Wan2.2's forward decides; num_steps/split_step count calls (2 per step)."""
    acc_err, acc_steps, acc_ratio = [0.0, 0.0], [0, 0], [1.0, 1.0]
    out = []
    for cnt in range(num_steps):
        use = True
        if split_step is not None:
            if mode == "i2v":
                if cnt < int(split_step + (num_steps - split_step) * retention):
                    use = False
            elif cnt < int(split_step * retention) or (
                    split_step <= cnt <= (num_steps - split_step) * retention + split_step):
                use = False
        elif cnt < int(num_steps * retention):
            use = False
        skip = False
        if use:
            acc_ratio[cnt % 2] *= mag_ratios[cnt]
            acc_steps[cnt % 2] += 1
            acc_err[cnt % 2] += abs(1 - acc_ratio[cnt % 2])
            if acc_err[cnt % 2] < thresh and acc_steps[cnt % 2] <= K:
                skip = True
            else:
                acc_err[cnt % 2], acc_steps[cnt % 2], acc_ratio[cnt % 2] = 0, 0, 1.0
        out.append(skip)
    return out


@pytest.mark.parametrize("model,mode,steps,shift,boundary", [("t2v_a14b", "t2v", 40, 12.0, 0.875),
                                                               ("i2v_a14b", "i2v", 40, 5.0, 0.9),
                                                               ("t2v_a14b", "t2v", 27, 12.0, 0.875)])
@pytest.mark.parametrize("thresh,K,retention", [(0.06, 2, 0.4), (0.12, 3, 0.2), (0.04, 2, 0.1)])
def test_calls_match_the_official_decisions(model, mode, steps, shift, boundary, thresh, K, retention):
    ratios = per_call_ratios(PUBLISHED_MAG_RATIOS[model], steps)
    split = 2 * high_noise_steps(steps, shift, boundary)
    ours = magcache_calls(ratios, split, mode, thresh, K, retention)
    assert ours == _official_decisions(list(ratios), 2 * steps, split, mode, thresh, K, retention)


def test_ti2v_one_model_and_resampling():
    ratios = per_call_ratios(PUBLISHED_MAG_RATIOS["ti2v_5b_t2v"], 50)
    assert len(ratios) == 100 and ratios[0] == ratios[1] == 1.0
    assert magcache_calls(ratios, None, "t2v", 0.06, 2, 0.2) == _official_decisions(list(ratios), 100, None, "t2v",
                                                                                      0.06, 2, 0.2)
    # 25 steps from a 50-step curve: each branch by nearest neighbour, cond and uncond stay interleaved
    half = per_call_ratios(PUBLISHED_MAG_RATIOS["ti2v_5b_t2v"], 25)
    full = np.array([1.0, 1.0, *PUBLISHED_MAG_RATIOS["ti2v_5b_t2v"]])
    idx = np.round(np.arange(25) * 49 / 24).astype(int)
    assert np.array_equal(half[0::2], full[0::2][idx]) and np.array_equal(half[1::2], full[1::2][idx])


def test_published_t2v_a14b_schedule_shape():
    s = magcache_schedule("t2v_a14b", 40, 12.0, 0.875)
    assert s["high_noise_steps"] == 26 and [len(e) for e in s["experts"]] == [26, 14]
    high, low = s["experts"]
    # the retention windows run in full: the first int(52·0.4) = 20 calls (10 steps) of the high-noise expert,
    # calls 52..63 (steps 26..31) at the start of the low-noise expert; and each expert's first step always runs
    assert not any(high[:10]) and not any(low[:6])
    runs, run = [], 0
    for c in high + low:
        run = run + 1 if c else 0
        runs.append(run)
    assert max(runs) <= 2  # max_skips
    assert s["cached_steps"] == sum(high) + sum(low) and s["computed_steps"] == 40 - s["cached_steps"]
    assert 0 < s["cached_steps"] < 20


def test_a_magnitude_jump_forces_a_full_step():
    ratios = np.ones(20)
    ratios[10:12] = 0.5  # step 5: the residual halves in both branches
    calls = magcache_calls(ratios, None, "t2v", 0.06, 10, 0.0)
    assert calls[10] is False and calls[11] is False and all(calls[:10]) and all(calls[12:])


def test_cli_writes_a_schedule_the_step_cache_reads(tmp_path):
    out = tmp_path / "s.json"
    r = subprocess.run([sys.executable, "-m", "renderer.cache_schedules", "model=t2v_a14b", "steps=20",
                        f"out={out}"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    data = load_schedule(out)
    assert [len(e) for e in data["experts"]] == [high_noise_steps(20, 12.0, 0.875), 20 - data["high_noise_steps"]]
    assert json.loads(out.read_text())["source"].startswith("MagCache")
    bad = subprocess.run([sys.executable, "-m", "renderer.cache_schedules", "model=tiny_t2v"], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "no published MagCache calibration for model 'tiny_t2v'" in bad.stderr
    assert "Traceback" not in bad.stderr
    with pytest.raises(ValueError, match="retention must lie in"):
        magcache_schedule("t2v_a14b", 40, 12.0, 0.875, retention=1.5)


def test_fast_tier_auto_cache_replays_the_published_schedule_in_a_render():
    """quality=fast (cache method auto) on a model with a published calibration: the render's caches serve exactly
    the steps of magcache_schedule (cond and uncond each); on one without, they stay the residual cache."""
    from dataclasses import replace

    from renderer.pipeline import Pipeline, RenderOptions, ShotSpec
    from renderer.presets import load_preset
    from renderer.tiers import load_tier

    tier = load_tier("fast", {"linear": "bf16"})  # the cache only: FP8 is tested elsewhere
    assert tier.cache.method == "auto"
    tiny = load_preset("tiny_t2v")
    as_a14b = replace(tiny, name="t2v_a14b")  # the tiny weights under the A14B name: its calibration applies
    pipe = Pipeline(as_a14b, options=RenderOptions(progress=False), tier=tier)
    steps = 12
    pipe.render(ShotSpec(prompt="p", steps=steps, seed=1))
    plan = magcache_schedule("t2v_a14b", steps, tiny.shift, tiny.boundary)
    assert pipe.cache_plan == f"magcache (published calibration, {plan['cached_steps']} of {steps} steps cached)"
    assert plan["cached_steps"] > 0
    cached = [c.stats.cached for c in pipe.step_caches]
    assert cached == [2 * sum(e) for e in plan["experts"]]  # sequential CFG: cond and uncond skip together
    assert pipe.describe()["step_cache_plan"] == pipe.cache_plan
    plain = Pipeline(tiny, options=RenderOptions(progress=False), tier=tier)
    plain.render(ShotSpec(prompt="p", steps=4, seed=1))
    assert plain.cache_plan.startswith("fbcache (threshold 0.08; no published MagCache calibration for tiny_t2v)")
