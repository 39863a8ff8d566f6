"""Wan2.2's output-size rule and input-image preparation, as the official generate() does them.

size: auto (the default for i2v and ti2v) takes the target area of the preset's default size (the official
`max_area`, e.g. 1280·720) and the input image's aspect ratio:
  * A14B i2v: latent height = round(floor(floor(√(area·h/w) / 8) / 2) · 2), width likewise from √(area·w/h);
    output = latent · 8 (wan/image2video.py);
  * TI2V-5B: the official `best_output_size` — try rounding the width down to a multiple of 32 first (height
    from the area), then the height first, and keep whichever aspect ratio is closer to the image's
    (wan/textimage2video.py, wan/utils/utils.py).
The image then becomes the conditioning frame at that size:
  * A14B i2v: squashed to the size with bicubic interpolation of the [-1, 1] tensor (torch, align_corners=False,
    no antialias), no crop;
  * TI2V-5B: PIL Lanczos resize so the image covers the size, then a centre crop.
Pixels become [-1, 1] as torchvision's to_tensor(x).sub(0.5).div(0.5) does (x/255 first), so the conditioning
frame equals the official one bit for bit on the same image.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def i2v_auto_size(width: int, height: int, max_area: int, stride: tuple[int, int] = (8, 8),
                  patch: tuple[int, int] = (2, 2)) -> tuple[int, int]:
    """(out width, out height) for an A14B i2v shot from an image of width × height pixels."""
    aspect = height / width
    # floor divisions on floats, then round(): the official rounding, step by step
    lat_h = round(math.sqrt(max_area * aspect) // stride[0] // patch[0] * patch[0])
    lat_w = round(math.sqrt(max_area / aspect) // stride[1] // patch[1] * patch[1])
    return lat_w * stride[1], lat_h * stride[0]


def ti2v_auto_size(width: int, height: int, max_area: int, multiple: tuple[int, int] = (32, 32)) -> tuple[int, int]:
    """(out width, out height) for a TI2V-5B shot: the size within `max_area`, multiples of `multiple` (w, h),
    whose aspect ratio is closest to the image's, trying width-first and height-first rounding."""
    dw, dh = multiple
    ratio = width / height
    exact_w = math.sqrt(max_area * ratio)
    exact_h = max_area / exact_w
    w_first = int(exact_w // dw * dw)
    candidate_a = (w_first, int(max_area / w_first // dh * dh)) if w_first else (0, 0)
    h_first = int(exact_h // dh * dh)
    candidate_b = (int(max_area / h_first // dw * dw), h_first) if h_first else (0, 0)

    def mismatch(c: tuple[int, int]) -> float:
        if not (c[0] and c[1]):  # an aspect too extreme for this area (the official code fails an assert here)
            return math.inf
        r = c[0] / c[1]
        return max(ratio / r, r / ratio)

    if math.isinf(mismatch(candidate_a)) and math.isinf(mismatch(candidate_b)):
        return max(candidate_a[0], candidate_b[0], dw), max(candidate_a[1], candidate_b[1], dh)
    return candidate_a if mismatch(candidate_a) < mismatch(candidate_b) else candidate_b


def auto_size(task: str, width: int, height: int, max_area: int, vae_stride: tuple[int, int, int],
              patch_size: tuple[int, int, int]) -> tuple[int, int]:
    """The official output size for `task` from an image of width × height."""
    if task == "ti2v":
        return ti2v_auto_size(width, height, max_area, (vae_stride[2] * patch_size[2], vae_stride[1] * patch_size[1]))
    return i2v_auto_size(width, height, max_area, vae_stride[1:], patch_size[1:])


def _to_tensor(im) -> torch.Tensor:
    """RGB PIL image -> [3, H, W] fp32 in [-1, 1], rounding as to_tensor(...).sub_(0.5).div_(0.5)."""
    arr = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)  # [3, H, W] uint8
    return arr.float().div(255).sub_(0.5).div_(0.5)  # [3, H, W]


def prepare_image(task: str, path: str, size: tuple[int, int]) -> torch.Tensor:
    """The conditioning frame for `task` at size (width, height): [3, H, W] fp32 in [-1, 1] on the CPU."""
    from PIL import Image

    from renderer.video_io import open_rgb

    ow, oh = size
    im = open_rgb(path)
    if task == "ti2v":
        scale = max(ow / im.width, oh / im.height)
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.LANCZOS)
        x0, y0 = (im.width - ow) // 2, (im.height - oh) // 2
        return _to_tensor(im.crop((x0, y0, x0 + ow, y0 + oh)))  # [3, oh, ow]
    img = _to_tensor(im)[None]  # [1, 3, h, w]
    return F.interpolate(img, size=(oh, ow), mode="bicubic")[0]  # [3, oh, ow]: squashed, no crop
