"""Official Wan2.2 behaviours, each against an independent transcription of the official code (wan/image2video.py,
wan/textimage2video.py, wan/utils/utils.py, generate.py): size auto, input-image preparation, the default negative
prompt, seed -1, and noise drawn on the render device."""
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from renderer.families.wan22.images import auto_size, i2v_auto_size, prepare_image, ti2v_auto_size
from renderer.families.wan22.prompts import DEFAULT_NEGATIVE_PROMPT
from renderer.pipeline import ShotSpec
from renderer.presets import check_shot, load_preset


# -- transcriptions of the official formulas ------------------------------------------------------------------
def official_i2v_hw(h, w, max_area, vae_stride=(4, 8, 8), patch=(1, 2, 2)):
    aspect_ratio = h / w
    lat_h = round(np.sqrt(max_area * aspect_ratio) // vae_stride[1] // patch[1] * patch[1])
    lat_w = round(np.sqrt(max_area / aspect_ratio) // vae_stride[2] // patch[2] * patch[2])
    return lat_h * vae_stride[1], lat_w * vae_stride[2]


def official_best_output_size(w, h, dw, dh, expected_area):
    ratio = w / h
    ow = (expected_area * ratio) ** 0.5
    oh = expected_area / ow
    ow1 = int(ow // dw * dw)
    oh1 = int(expected_area / ow1 // dh * dh)
    ratio1 = ow1 / oh1
    oh2 = int(oh // dh * dh)
    ow2 = int(expected_area / oh2 // dw * dw)
    ratio2 = ow2 / oh2
    if max(ratio / ratio1, ratio1 / ratio) < max(ratio / ratio2, ratio2 / ratio):
        return ow1, oh1
    return ow2, oh2


def to_tensor_official(im):  # torchvision's to_tensor(img).sub_(0.5).div_(0.5), for RGB uint8 images
    return torch.from_numpy(np.array(im)).permute(2, 0, 1).float().div(255).sub_(0.5).div_(0.5)


IMAGE_SIZES = [(1920, 1080), (1080, 1920), (1024, 1024), (640, 480), (3000, 2000), (500, 1300), (777, 333),
               (97, 61), (4032, 3024)] + [(random.Random(i).randint(50, 4000), random.Random(i + 99).randint(50, 4000))
                                          for i in range(40)]


@pytest.mark.parametrize("area", [1280 * 720, 832 * 480, 64 * 48])
def test_i2v_auto_size_is_the_official_formula(area):
    for w, h in IMAGE_SIZES:
        oh, ow = official_i2v_hw(h, w, area)
        assert i2v_auto_size(w, h, area) == (ow, oh), (w, h)
        assert auto_size("i2v", w, h, area, (4, 8, 8), (1, 2, 2)) == (ow, oh)


@pytest.mark.parametrize("area", [1280 * 704, 96 * 64])
def test_ti2v_auto_size_is_the_official_best_output_size(area):
    compared = 0
    for w, h in IMAGE_SIZES:
        try:
            want = official_best_output_size(w, h, 32, 32, area)
            assert want[0] * want[1] > 0
        except (ZeroDivisionError, AssertionError):  # an aspect too extreme for the area: the official fails
            ow, oh = ti2v_auto_size(w, h, area)
            assert ow >= 32 and oh >= 32 and ow % 32 == 0 and oh % 32 == 0  # ours still gives a valid size
            continue
        compared += 1
        assert ti2v_auto_size(w, h, area) == want, (w, h)
        assert auto_size("ti2v", w, h, area, (4, 16, 16), (1, 2, 2)) == want
    assert compared >= len(IMAGE_SIZES) // 2


def _image(tmp_path, w, h, seed=0):
    path = tmp_path / f"in_{w}x{h}.png"
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.mark.parametrize("w,h", [(97, 61), (64, 128), (200, 150)])
def test_i2v_image_is_squashed_bicubic_as_official(tmp_path, w, h):
    path = _image(tmp_path, w, h)
    oh, ow = official_i2v_hw(h, w, 64 * 48)
    img = to_tensor_official(Image.open(path).convert("RGB"))
    want = F.interpolate(img[None], size=(oh, ow), mode="bicubic")[0]  # official: no crop, aspect squashed
    got = prepare_image("i2v", path, (ow, oh))
    assert got.shape == (3, oh, ow) and torch.equal(got, want)


@pytest.mark.parametrize("w,h", [(97, 61), (64, 128), (300, 200)])
def test_ti2v_image_is_lanczos_and_centre_crop_as_official(tmp_path, w, h):
    path = _image(tmp_path, w, h, seed=1)
    ow, oh = official_best_output_size(w, h, 32, 32, 96 * 64)
    img = Image.open(path).convert("RGB")
    scale = max(ow / w, oh / h)
    img = img.resize((round(w * scale), round(h * scale)), Image.LANCZOS)
    x1, y1 = (img.width - ow) // 2, (img.height - oh) // 2
    want = to_tensor_official(img.crop((x1, y1, x1 + ow, y1 + oh)))
    got = prepare_image("ti2v", path, (ow, oh))
    assert got.shape == (3, oh, ow) and torch.equal(got, want)


def test_size_auto_is_the_default_for_image_tasks_and_explicit_sizes_still_work(tmp_path):
    path = _image(tmp_path, 1920, 1080)
    i2v = load_preset("i2v_a14b")
    s = ShotSpec(prompt="p", image=path).resolve(i2v)
    assert s.size == "1280*720"  # 16:9 in 1280·720: the official size
    s = ShotSpec(prompt="p", image=_image(tmp_path, 1000, 1000)).resolve(i2v)
    oh, ow = official_i2v_hw(1000, 1000, 1280 * 720)
    assert s.size == f"{ow}*{oh}" and not check_shot(i2v, s.task, s.size, 81, 40, "p", s.image)
    assert ShotSpec(prompt="p", image=path, size="832*480").resolve(i2v).size == "832*480"
    ti2v = load_preset("ti2v_5b")
    s = ShotSpec(prompt="p", image=_image(tmp_path, 1080, 1920)).resolve(ti2v)
    assert s.task == "ti2v" and s.size == "%d*%d" % official_best_output_size(1080, 1920, 32, 32, 1280 * 704)
    assert ShotSpec(prompt="p").resolve(ti2v).size == "1280*704"  # t2v keeps the preset's default size
    problems = dict(check_shot(ti2v, "t2v", "auto", 121, 50, "p", None))
    assert "size auto derives the size from an input image" in problems["size"]


def test_empty_negative_prompt_means_the_default_and_is_recorded(tmp_path):
    from renderer.cli import main
    from renderer.video_io import read_json

    base = ["generate", "model=tiny_t2v", "prompt=waves", "steps=1", "render.progress=false", f"out={tmp_path}"]
    assert main(base + ["negative_prompt=", "name=empty"]) == 0
    assert main(base + ["name=unset"]) == 0
    empty, unset = read_json(tmp_path / "empty.json"), read_json(tmp_path / "unset.json")
    assert empty["negative_prompt"] == unset["negative_prompt"] == DEFAULT_NEGATIVE_PROMPT
    assert empty["render_hash"] == unset["render_hash"]
    for p in ("", "   ", None):
        assert ShotSpec(prompt="x", negative_prompt=p).resolve(load_preset("tiny_t2v")).negative_prompt \
            == DEFAULT_NEGATIVE_PROMPT


def test_seed_minus_one_draws_a_random_seed_and_records_it(tmp_path):
    from renderer.cli import main
    from renderer.video_io import read_json

    base = ["generate", "model=tiny_t2v", "prompt=waves", "steps=1", "render.progress=false", f"out={tmp_path}",
            "seed=-1"]
    assert main(base + ["name=a"]) == 0 and main(base + ["name=b"]) == 0
    a, b = read_json(tmp_path / "a.json"), read_json(tmp_path / "b.json")
    assert a["seed_random"] and isinstance(a["seed"], int) and 0 <= a["seed"] <= 2**63 - 1
    assert a["seed"] != b["seed"]
    assert a["render_hash"] == b["render_hash"]  # asked the same (-1): a resubmitted job finds it done
    shot = ShotSpec(prompt="x", seed=-1).resolve(load_preset("tiny_t2v"))
    assert shot.resolve(load_preset("tiny_t2v")).seed == shot.seed  # resolving again keeps the drawn seed
    assert dict(check_shot(load_preset("tiny_t2v"), "t2v", "64*48", 9, 2, "p", None, seed=-2))["seed"].startswith(
        "seed must be an integer")


def test_noise_on_the_device_is_drawn_as_official():
    from renderer.pipeline import Pipeline, RenderOptions

    preset = load_preset("tiny_t2v")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = Pipeline(preset, options=RenderOptions(device=device, noise_device="device", progress=False))
    shape = (16, 3, 6, 8)
    g = torch.Generator(device=device)
    g.manual_seed(123)
    want = torch.randn(*shape, dtype=torch.float32, device=device, generator=g)  # official: no batch dim
    got = pipe.initial_noise(shape, 123)
    assert got.shape == (1, *shape) and torch.equal(got[0], want)
    with pytest.raises(ValueError, match="render.noise_device='gpu'"):
        RenderOptions(noise_device="gpu")
    cpu = Pipeline(preset, options=RenderOptions(device=device, progress=False), components=(
        pipe.text_encoder, pipe.vae, pipe.experts)).initial_noise(shape, 123)
    assert torch.equal(cpu[0], torch.randn(*shape, generator=torch.Generator().manual_seed(123)))
    assert math.isfinite(float(got.std()))
