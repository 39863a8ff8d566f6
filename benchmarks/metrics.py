"""Image-quality figures for comparing two renders of one shot: latent relative error, PSNR and SSIM.

SSIM is our own (Wang, Bovik, Sheikh, Simoncelli 2004: 11×11 Gaussian window, σ = 1.5, K1 = 0.01, K2 = 0.03,
dynamic range 255, computed per RGB channel on the valid window positions and averaged) — 30 lines of torch
instead of scikit-image and its dependency tree in the render environment (the GPU machines do not have it);
tests/test_quality.py holds it to a brute-force loop over the windows and to SSIM's closed forms.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def latent_rel_error(latent: torch.Tensor, reference: torch.Tensor) -> float:
    """‖latent − reference‖₂ / ‖reference‖₂ (float64)."""
    if latent.shape != reference.shape:
        raise ValueError(f"latents differ in shape: {tuple(latent.shape)} vs {tuple(reference.shape)}")
    return ((latent.double() - reference.double()).norm() / reference.double().norm()).item()


def psnr(frames: np.ndarray, reference: np.ndarray) -> float:
    """PSNR in dB over all frames and channels of uint8 video [F, H, W, 3]; inf when identical."""
    if frames.shape != reference.shape:
        raise ValueError(f"videos differ in shape: {frames.shape} vs {reference.shape}")
    mse = np.mean((frames.astype(np.float64) - reference.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """[size, size] float64, sums to 1."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim_maps(a: torch.Tensor, b: torch.Tensor, window: torch.Tensor, data_range: float = 255.0) -> torch.Tensor:
    """a, b: [N, 1, H, W] float64 -> the SSIM map over the valid window positions [N, 1, H-w+1, W-w+1]."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    w = window[None, None]  # [1, 1, k, k]
    mu_a, mu_b = F.conv2d(a, w), F.conv2d(b, w)  # local means
    var_a = F.conv2d(a * a, w) - mu_a**2
    var_b = F.conv2d(b * b, w) - mu_b**2
    cov = F.conv2d(a * b, w) - mu_a * mu_b
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))


def ssim(frames: np.ndarray, reference: np.ndarray, window_size: int = 11) -> float:
    """Mean SSIM of uint8 video [F, H, W, 3] against `reference` (per channel, averaged over frames)."""
    if frames.shape != reference.shape:
        raise ValueError(f"videos differ in shape: {frames.shape} vs {reference.shape}")
    f, h, w, c = frames.shape
    k = min(window_size, h, w) | 1  # an odd window no larger than the frame (tiny test renders are 48 px)
    to = lambda v: torch.from_numpy(np.ascontiguousarray(v)).double().permute(0, 3, 1, 2).reshape(f * c, 1, h, w)
    return ssim_maps(to(frames), to(reference), gaussian_window(k, 1.5 * k / 11)).mean().item()
