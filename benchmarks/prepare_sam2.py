"""How long the replacement mask takes: SAM2 hiera-large (random weights: the compute is the same) tracking a
synthetic plate, per frame, with the keypoint prompts the preprocessing stage gives it.

    python -m benchmarks.prepare_sam2 --device cuda --frames 77 --size 1280x720      # on an H200
    python -m benchmarks.prepare_sam2 --tiny --frames 4 --size 160x96                 # CPU smoke (tiny config)

Prints one JSON line: frames, size, seconds, frames/s, peak GPU memory. The farm's preprocessing stage runs this
per Animate replace shot before any render group starts, so it says whether preprocessing can keep up.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def synthetic_track(frames: int, width: int, height: int):
    """Stick-figure frames [T,H,W,3] and their keypoints [T,133,3] from the figure's geometry."""
    from renderer.prepare.synthetic import _keypoint_template, draw_figure, figure_center

    fig_h = height * 0.8
    template = _keypoint_template()  # [133,2] in figure-height units
    video, kps = [], []
    for t in range(frames):
        c = figure_center(t, frames, width, height)
        video.append(draw_figure(width, height, c, fig_h))
        kps.append(np.concatenate([template * fig_h + np.array(c), np.ones((133, 1))], 1))
    return np.stack(video), np.stack(kps)  # [T,H,W,3], [T,133,3]


def main(argv=None) -> dict:
    import torch
    from hydra.utils import instantiate

    from renderer.prepare.mask import refine, sam2_model_config, track_character
    from renderer.prepare.synthetic import tiny_sam2_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--frames", type=int, default=77)
    ap.add_argument("--size", default="1280x720")
    ap.add_argument("--tiny", action="store_true", help="the tiny test config instead of hiera-large")
    a = ap.parse_args(argv)
    width, height = (int(v) for v in a.size.lower().split("x"))
    frames, kps = synthetic_track(a.frames, width, height)
    torch.manual_seed(0)
    model = instantiate(sam2_model_config(tiny_sam2_config() if a.tiny else None), _recursive_=True)
    model = model.to(a.device).eval()
    if a.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    masks = track_character(model, frames, kps)  # [T,H,W]
    masks = np.stack([refine(m, 7, 3, 1, 1) for m in masks])
    if a.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    row = {"bench": "prepare_sam2", "config": "tiny" if a.tiny else "hiera_large", "device": a.device,
           "frames": int(masks.shape[0]), "size": f"{width}x{height}", "seconds": round(seconds, 3),
           "frames_per_s": round(masks.shape[0] / seconds, 2),
           "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if a.device.startswith("cuda") else None}
    print(json.dumps(row))
    return row


if __name__ == "__main__":
    main()
