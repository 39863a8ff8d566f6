"""`wanrender generate` on the CPU: tiny T2V, I2V and TI2V shots to MP4 + sidecar; bad input -> clear errors."""
import json

import numpy as np
import pytest
from PIL import Image

from renderer.cli import main
from renderer.video_io import read_json, read_mp4_metadata, video_info


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("in") / "frame.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.mark.parametrize("model,extra,size,fps", [
    ("tiny_t2v", [], (64, 48), 16),
    ("tiny_i2v", ["image={image}"], (64, 32), 16),  # size auto: the 96×64 image's aspect in 64·48 pixels
    ("tiny_ti2v", ["image={image}"], (96, 64), 24),
])
def test_generate_writes_mp4_and_sidecar(tmp_path, image, model, extra, size, fps):
    out = tmp_path / "out"
    args = ["generate", f"model={model}", "prompt=a red kite over a beach", "seed=7", "steps=3",
            f"out={out}", "name=kite", "render.progress=false"] + [e.format(image=image) for e in extra]
    assert main(args) == 0
    mp4, side = out / "kite.mp4", out / "kite.json"
    info = video_info(mp4)
    assert (info["frames"], info["width"], info["height"]) == (9, *size)
    assert info["fps"] == pytest.approx(fps)
    meta = read_mp4_metadata(mp4)
    assert meta["comment"] == "a red kite over a beach" and meta["seed"] == "7" and meta["ai_generated"] == "true"
    s = read_json(side)
    assert s["prompt"] == "a red kite over a beach" and s["seed"] == 7 and s["model"] == model
    assert s["steps"] == 3 and s["frames"] == 9 and s["size"] == f"{size[0]}*{size[1]}"
    assert s["task"] == {"tiny_t2v": "t2v", "tiny_i2v": "i2v", "tiny_ti2v": "ti2v"}[model]
    assert set(s["timings_s"]) >= {"text_encode", "denoise", "vae_decode", "mp4_write"}
    assert s["code_version"].startswith("0.1.0") and len(s["render_hash"]) == 20
    assert json.loads(json.dumps(s)) == s  # the sidecar round-trips as plain JSON
    assert not list(out.glob(".*tmp*")), "no temporary files are left behind"


def test_same_seed_same_video_and_other_seed_differs(tmp_path):
    from renderer.video_io import read_video

    base = ["generate", "model=tiny_t2v", "prompt=waves", "steps=2", "render.progress=false", f"out={tmp_path}"]
    assert main(base + ["seed=1", "name=a"]) == 0
    assert main(base + ["seed=1", "name=b"]) == 0
    assert main(base + ["seed=2", "name=c"]) == 0
    a, b, c = (read_video(tmp_path / f"{n}.mp4") for n in "abc")
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 1.0
    assert read_json(tmp_path / "a.json")["render_hash"] == read_json(tmp_path / "b.json")["render_hash"]
    assert read_json(tmp_path / "a.json")["render_hash"] != read_json(tmp_path / "c.json")["render_hash"]


@pytest.mark.parametrize("override,field,words", [
    (["size=1000*1000"], "size", "does not support size 1000*1000: use one of 64*48"),
    (["frames=10"], "frames", "frames must be 4n+1 (e.g. 9 or 13)"),
    (["prompt=   "], "prompt", "the prompt is empty"),
    (["model=tiny_i2v"], "image", "task i2v needs an input image"),
    (["model=tiny_i2v", "image=/nonexistent/frame.png"], "image", "/nonexistent/frame.png does not exist"),
    (["task=i2v"], "task", "model tiny_t2v cannot do 'i2v'"),
    (["sampler=heun"], "sampler", "unknown sampler 'heun': use one of unipc, dpm++, euler"),
    (["steps=0"], "steps", "steps must be a positive integer; got 0"),
])
def test_bad_input_is_reported_before_compute(tmp_path, capsys, monkeypatch, override, field, words):
    import renderer.pipeline

    def no_pipeline(*a, **k):
        raise AssertionError("a model was loaded for a bad request")

    monkeypatch.setattr(renderer.pipeline.Pipeline, "__init__", no_pipeline)
    args = ["generate", "model=tiny_t2v", "prompt=a kite", f"out={tmp_path}"]
    args = [a for a in args if not any(a.split("=")[0] == o.split("=")[0] for o in override)] + override
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"shot shot: {field}: " in err and words in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("override,words", [
    ("kernels.attention=fa9", "kernels: kernels.attention='fa9': choose one of auto"),
    ("kernels.precision=fp8", "kernels: kernels.precision='fp8'"),
    ("render.noise_device=gpu", "render: render.noise_device='gpu': use cpu"),
    ("seed=-5", "seed: seed must be an integer from 0 to 2^63-1, or -1 for a random one"),
])
def test_bad_settings_are_named_before_compute(tmp_path, capsys, monkeypatch, override, words):
    import renderer.pipeline

    def no_pipeline(*a, **k):
        raise AssertionError("a model was loaded for a bad request")

    monkeypatch.setattr(renderer.pipeline.Pipeline, "__init__", no_pipeline)
    assert main(["generate", "model=tiny_t2v", "prompt=a kite", f"out={tmp_path}", override]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_unreadable_image_is_reported(tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    assert main(["generate", "model=tiny_i2v", "prompt=x", f"image={bad}", f"out={tmp_path / 'o'}"]) == 2
    assert f"input image {bad} cannot be read" in capsys.readouterr().err


def test_unknown_override_and_command(capsys):
    assert main(["generate", "model=no_such_model"]) == 2
    assert "no_such_model" in capsys.readouterr().err
    assert main(["paint"]) == 2
    assert "unknown command 'paint'" in capsys.readouterr().err
