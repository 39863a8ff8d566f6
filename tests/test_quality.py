"""benchmarks.metrics (PSNR, our SSIM), benchmarks.quality (exact vs a tier, same seed; the bounds CI asserts on
the tiny model) and benchmarks.calibrate_cache (a schedule recorded from an exact render, replayed by the cache)."""
import json
import math

import numpy as np
import pytest
import torch

from benchmarks.metrics import gaussian_window, latent_rel_error, psnr, ssim, ssim_maps

# tiny_t2v, seed 0, 6 steps, random weights — numerical deviation only (README "Quality tiers"):
FAST_MAX_LATENT_ERR = 0.06  # FP8 linears, cache at its default threshold (measured 0.032)
FAST_MIN_PSNR = 40.0  # measured 49.9 dB
FAST_MIN_SSIM = 0.99  # measured 0.998


def _brute_ssim(a: np.ndarray, b: np.ndarray, k: int, sigma: float) -> float:
    """SSIM by an explicit loop over every valid window (the textbook definition, float64)."""
    w = gaussian_window(k, sigma).numpy()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for i in range(a.shape[0] - k + 1):
        for j in range(a.shape[1] - k + 1):
            x, y = a[i:i + k, j:j + k], b[i:i + k, j:j + k]
            mx, my = (w * x).sum(), (w * y).sum()
            vx, vy = (w * (x - mx) ** 2).sum(), (w * (y - my) ** 2).sum()
            cxy = (w * (x - mx) * (y - my)).sum()
            vals.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_ssim_against_the_window_loop_and_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (1, 20, 23, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-40, 40, a.shape), 0, 255).astype(np.uint8)
    want = np.mean([_brute_ssim(a[0, :, :, c].astype(float), b[0, :, :, c].astype(float), 11, 1.5) for c in range(3)])
    assert ssim(a, b) == pytest.approx(want, rel=1e-10)
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    assert ssim(a, b) == pytest.approx(ssim(b, a), rel=1e-12)
    # two flat images: only the luminance term is left, (2·μa·μb + C1) / (μa² + μb² + C1)
    fa, fb = np.full((1, 16, 16, 3), 100, np.uint8), np.full((1, 16, 16, 3), 120, np.uint8)
    c1 = (0.01 * 255) ** 2
    assert ssim(fa, fb) == pytest.approx((2 * 100 * 120 + c1) / (100**2 + 120**2 + c1), rel=1e-10)
    noisier = np.clip(a.astype(int) + rng.integers(-90, 90, a.shape), 0, 255).astype(np.uint8)
    assert ssim(a, noisier) < ssim(a, b) < 1.0


def test_psnr_and_latent_error():
    a = np.zeros((2, 4, 4, 3), np.uint8)
    b = a.copy()
    assert psnr(a, b) == math.inf
    b[0, 0, 0, 0] = 255  # mse = 255² / 96
    assert psnr(a, b) == pytest.approx(10 * math.log10(96))
    x = torch.ones(2, 3)
    assert latent_rel_error(x * 1.1, x) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="differ in shape"):
        latent_rel_error(torch.ones(2), torch.ones(3))


def test_quality_command_fast_within_bounds(tmp_path, capsys):
    from benchmarks.quality import main

    args = ["model=tiny_t2v", "quality=fast", f"out={tmp_path}", f"max_latent_err={FAST_MAX_LATENT_ERR}",
            f"min_psnr={FAST_MIN_PSNR}", f"min_ssim={FAST_MIN_SSIM}"]
    assert main(args) == 0
    report = json.loads((tmp_path / "quality_tiny_t2v_fast.json").read_text())
    print(capsys.readouterr().out)
    assert 1e-4 < report["latent_rel_err"] <= FAST_MAX_LATENT_ERR  # FP8 really ran, and stayed close
    assert report["tier"]["tier"]["linear"] == "fp8" and report["exact"]["tier"]["name"] == "exact"
    assert report["exact"]["steps"] == report["tier"]["steps"] == 6
    assert "numerical deviation only" in report["note"]
    assert report["code_version"].startswith("0.") and report["provenance"]["digest"]  # which code measured it
    assert (tmp_path / "quality_tiny_t2v_fast.md").read_text().count("|") > 10
    # an impossible bound fails the command (CI would go red)
    assert main(args[:3] + ["max_latent_err=1e-9"]) == 1
    assert main(["quality=turbo"]) == 2 and main(["colour=blue"]) == 2


def test_calibrated_schedule_drives_the_fast_tier(tmp_path):
    from benchmarks.calibrate_cache import main as calibrate
    from benchmarks.quality import main as quality

    sched = tmp_path / "sched.json"
    assert calibrate(["threshold=1.5", "steps=8", f"out={sched}"]) == 0
    data = json.loads(sched.read_text())
    assert data["steps_per_expert"] == [6, 2] and data["valid_for"]["steps"] == 8
    assert data["metrics"][0][0] is None  # an expert's first step has nothing to compare with
    assert sum(data["cached_steps"]) > 0
    args = ["quality=fast", "quality.linear=bf16", "quality.cache.method=schedule", f"quality.cache.schedule={sched}",
            "steps=8", f"out={tmp_path}"]
    assert quality(args) == 0
    report = json.loads((tmp_path / "quality_tiny_t2v_fast.json").read_text())
    cached = [c["cached"] for c in report["tier"]["step_cache"]]
    assert cached == [2 * n for n in data["cached_steps"]]  # cond and uncond follow the schedule together
    assert 0 < report["latent_rel_err"] < 0.5


def test_fp8_microbenchmark_cpu_smoke(tmp_path):
    from benchmarks.fp8_micro import main

    out = tmp_path / "fp8.json"
    assert main(["smoke=true", f"out={out}"]) == 0
    rows = {r["row"]: r for r in json.loads(out.read_text())["rows"]}
    lin = rows["linear"]
    assert lin["fp8_path"] == "cpu reference" and lin["bf16_s"] > 0 and lin["fp8_s"] > 0
    assert 1e-4 < lin["rel_rms_err"] <= 0.05  # the FP8 linear bound of tests/test_fp8.py
    assert "skipped" in rows["attention"]
    assert main(["tokens"]) == 2
