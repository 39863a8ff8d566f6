"""Tests for renderer.video_io: real ffmpeg encodes and decord decodes of tiny synthetic clips."""
import json
import os
import re
import stat
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from renderer import video_io as vio


def gradient_clip(f=9, h=48, w=64):
    """Smooth colour gradients that change per frame (no hard edges, so H.264 error stays small)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    frames = []
    for i in range(f):
        r = 30 + 190 * x / (w - 1)
        g = 30 + 190 * y / (h - 1)
        b = np.full_like(x, 20 + 20 * i)  # per-frame level, so frame order is checked too
        frames.append(np.stack([r, g, b], -1))
    return np.round(np.stack(frames)).astype(np.uint8)


def mae(a, b):
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def snapshot(folder):
    return sorted(os.listdir(folder))


# ---------------------------------------------------------------- ffmpeg / tensors

def test_ffmpeg_exe_falls_back_to_imageio_and_errors_clearly(monkeypatch, tmp_path):
    """A working ffmpeg on PATH wins; one that fails its check (no libx264, or does not run) falls back to the
    binary imageio-ffmpeg ships; none at all is an OSError naming both fixes (an environment fault)."""
    import imageio_ffmpeg

    good, bad = tmp_path / "good", tmp_path / "bad"
    for folder, script in ((good, "#!/bin/sh\necho ' V..... libx264   H.264'\n"), (bad, "#!/bin/sh\nexit 1\n")):
        folder.mkdir()
        (folder / "ffmpeg").write_text(script)
        (folder / "ffmpeg").chmod(0o755)
    vio._usable_ffmpeg.cache_clear()
    monkeypatch.setenv("PATH", f"{good}:{os.environ['PATH']}")
    assert vio.ffmpeg_exe() == str(good / "ffmpeg")  # PATH wins over the bundled binary
    monkeypatch.setenv("PATH", f"{bad}:/nonexistent")
    exe = vio.ffmpeg_exe()
    assert exe == imageio_ffmpeg.get_ffmpeg_exe() and os.access(exe, os.X_OK)

    def missing():
        raise RuntimeError("no binary")

    monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", missing)
    vio._usable_ffmpeg.cache_clear()
    with pytest.raises(OSError, match="no ffmpeg binary found.*imageio-ffmpeg"):
        vio.ffmpeg_exe()
    vio._usable_ffmpeg.cache_clear()


def test_to_uint8_frames_values_and_layout():
    # Channel c of frame f holds a distinct value so any transposition mistake shows.
    vals = torch.tensor([-1.0, 0.0, 1.0, 2.0, -3.0, 0.5])  # 0.0 -> 127.5 rounds to 128; 0.5 -> 191.25 -> 191
    video = torch.zeros(1, 3, 2, 4, 6)
    video[0, 0, 0] = vals  # red of frame 0, broadcast over rows
    video[0, 2, 1] = 1.0   # blue of frame 1
    out = vio.to_uint8_frames(video)
    assert out.shape == (2, 4, 6, 3) and out.dtype == np.uint8
    assert out[0, 0, :, 0].tolist() == [0, 128, 255, 255, 0, 191]
    assert (out[1, :, :, 2] == 255).all() and (out[1, :, :, 0] == 128).all()
    assert np.array_equal(vio.to_uint8_frames(video[0]), out)
    with pytest.raises(ValueError):
        vio.to_uint8_frames(torch.zeros(2, 3, 2, 4, 6))
    with pytest.raises(ValueError):
        vio.to_uint8_frames(torch.zeros(4, 2, 4, 6))


# ---------------------------------------------------------------- MP4 round trip

@pytest.mark.parametrize("fps", [16, 24])
def test_mp4_round_trip_frames_size_fps_pixels(tmp_path, fps):
    clip = gradient_clip()
    path = vio.write_mp4(clip, tmp_path / "shot.mp4", fps=fps)
    assert path == tmp_path / "shot.mp4"
    assert vio.video_info(path) == {"frames": 9, "width": 64, "height": 48, "fps": float(fps)}
    back = vio.read_video(path)
    assert back.shape == clip.shape and back.dtype == np.uint8
    # crf 18 on smooth gradients: measured ~1.7 grey levels (mean abs); bound 3 overall, 6 for any one frame.
    assert mae(back, clip) < 3.0
    assert max(mae(back[i], clip[i]) for i in range(len(clip))) < 6.0
    assert snapshot(tmp_path) == ["shot.mp4"]  # no temp file left behind


def test_read_video_num_frames_and_size(tmp_path):
    clip = gradient_clip()
    path = vio.write_mp4(clip, tmp_path / "a.mp4", fps=16)
    first4 = vio.read_video(path, num_frames=4)
    assert first4.shape == (4, 48, 64, 3) and mae(first4, clip[:4]) < 3.0
    assert vio.read_video(path, size=(32, 24)).shape == (9, 24, 32, 3)
    with pytest.raises(ValueError, match="9 frames"):
        vio.read_video(path, num_frames=10)


def test_write_mp4_accepts_iterable_of_frames(tmp_path):
    clip = gradient_clip(f=5)
    path = vio.write_mp4((f for f in clip), tmp_path / "gen.mp4", fps=16)
    assert mae(vio.read_video(path), clip) < 3.0


def test_extract_frames_first_middle_last(tmp_path):
    clip = gradient_clip()
    path = vio.write_mp4(clip, tmp_path / "a.mp4", fps=16)
    first, mid, last = vio.extract_frames(path, [0, 4, -1])
    for got, want in [(first, clip[0]), (mid, clip[4]), (last, clip[8])]:
        assert got.shape == (48, 64, 3) and mae(got, want) < 4.0
    # Neighbouring frames differ only in blue (20 levels a step): the right frame must be the closest.
    assert mae(last, clip[8]) < mae(last, clip[7])
    with pytest.raises(IndexError):
        vio.extract_frames(path, [9])
    with pytest.raises(IndexError):
        vio.extract_frames(path, [-10])


def test_metadata_round_trip(tmp_path):
    prompt = 'Ein "Drache" über Tōkyō, 夜景 🐉 — it\'s = ; # \\ done\n[not a section]\n;nor a comment'
    meta = {"comment": prompt, "title": "shot_007", "description": "wan2.2 t2v", "seed": "1234567"}
    path = vio.write_mp4(gradient_clip(f=3), tmp_path / "m.mp4", fps=16, metadata=meta)
    back = vio.read_mp4_metadata(path)
    assert {k: back.get(k) for k in meta} == meta
    assert back["ai_generated"] == "true"  # added even though the caller did not ask
    # A caller-given value is kept; non-string values are stringified.
    path = vio.write_mp4(gradient_clip(f=3), tmp_path / "n.mp4", fps=16,
                         metadata={"ai_generated": "true; model=wan2.2-ti2v-5b", "seed": 7})
    back = vio.read_mp4_metadata(path)
    assert back["ai_generated"] == "true; model=wan2.2-ti2v-5b" and back["seed"] == "7"
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.mp4"))):
        vio.read_mp4_metadata(tmp_path / "nope.mp4")


def test_ffmetadata_parser_stops_at_stream_sections():
    text = ";FFMETADATA1\ntitle=a\\=b\nseed=1\n[STREAM]\ntitle=stream tag\n"
    assert vio._parse_ffmetadata(text) == {"title": "a=b", "seed": "1"}


def test_label_changes_corner_only(tmp_path):
    clip = gradient_clip(f=4, h=96, w=160)
    stamped = vio.burn_label(clip, "AI-generated")
    changed = np.argwhere((stamped != clip).any(axis=(0, 3)))
    assert len(changed) > 100
    # Every changed pixel sits in the bottom-left corner (lower third, left half).
    assert changed[:, 0].min() >= 96 * 2 // 3 and changed[:, 1].max() < 160 // 2
    assert np.array_equal(clip, gradient_clip(f=4, h=96, w=160))  # input not modified

    plain = vio.read_video(vio.write_mp4(clip, tmp_path / "plain.mp4", fps=16))
    label = vio.read_video(vio.write_mp4(clip, tmp_path / "label.mp4", fps=16, label="AI-generated"))
    r0, c1 = changed[:, 0].min(), changed[:, 1].max()
    corner = (slice(None), slice(r0, None), slice(0, c1 + 1))
    assert mae(label[corner], plain[corner]) > 30  # black box with white text over a mid-grey gradient
    # Away from the label (top half) the two encodes agree to within codec noise.
    assert mae(label[:, : 96 // 2], plain[:, : 96 // 2]) < 1.5


def test_odd_size_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="even"):
        vio.write_mp4(gradient_clip(h=47), tmp_path / "odd.mp4", fps=16)
    with pytest.raises(ValueError, match="uint8"):
        vio.write_mp4(gradient_clip().astype(np.float32), tmp_path / "f.mp4", fps=16)
    assert snapshot(tmp_path) == []


# ---------------------------------------------------------------- atomicity

@pytest.fixture
def existing(tmp_path):
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"previous render \x00\x01 keep me")
    return path


def _spy_popen(monkeypatch):
    started = []
    real = vio.subprocess.Popen

    def popen(*a, **k):
        started.append(a[0])
        return real(*a, **k)

    monkeypatch.setattr(vio.subprocess, "Popen", popen)
    return started


def test_failure_midway_from_frame_source_leaves_old_file(existing, monkeypatch):
    started = _spy_popen(monkeypatch)
    clip = gradient_clip()

    def frames():
        yield from clip[:4]
        raise RuntimeError("VAE decode blew up")

    before = existing.read_bytes()
    with pytest.raises(RuntimeError, match="VAE decode"):
        vio.write_mp4(frames(), existing, fps=16)
    assert started, "the encoder should have been running when the failure hit"
    assert existing.read_bytes() == before
    assert snapshot(existing.parent) == ["clip.mp4"]


def test_inconsistent_frame_shape_midway_leaves_old_file(existing, monkeypatch):
    started = _spy_popen(monkeypatch)
    frames = list(gradient_clip(f=3)) + [gradient_clip(f=1, h=32)[0]]
    before = existing.read_bytes()
    with pytest.raises(ValueError, match="inconsistent"):
        vio.write_mp4(frames, existing, fps=16)
    assert started
    assert existing.read_bytes() == before
    assert snapshot(existing.parent) == ["clip.mp4"]


@pytest.mark.skipif(sys.platform == "win32", reason="fake encoder is a shell script")
def test_encoder_failure_after_writing_partial_output(existing, monkeypatch, tmp_path_factory):
    # A stand-in ffmpeg that creates its output file, writes junk into it, then fails.
    fake = tmp_path_factory.mktemp("bin") / "ffmpeg"
    fake.write_text('#!/bin/sh\nfor a; do case "$a" in *.mp4) out="$a";; esac; done\n'
                    'printf partial > "$out"\necho "x264 exploded" >&2\nexit 3\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(vio, "ffmpeg_exe", lambda: str(fake))
    before = existing.read_bytes()
    with pytest.raises(RuntimeError, match="exit 3.*x264 exploded"):
        vio.write_mp4(gradient_clip(), existing, fps=16)
    assert existing.read_bytes() == before
    assert snapshot(existing.parent) == ["clip.mp4"]


def test_successful_write_replaces_old_file(existing):
    vio.write_mp4(gradient_clip(), existing, fps=24)
    assert vio.video_info(existing)["frames"] == 9
    assert snapshot(existing.parent) == ["clip.mp4"]


# ---------------------------------------------------------------- images

def _three_bands(path, w=200, h=100):
    """Red | green | blue vertical bands; only the green middle [50,150) survives a square centre crop."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, :50, 0] = 255
    arr[:, 50:150, 1] = 255
    arr[:, 150:, 2] = 255
    Image.fromarray(arr).save(path)
    return arr


def test_load_image_range_and_exact_values(tmp_path):
    arr = _three_bands(tmp_path / "bands.png")
    t = vio.load_image(tmp_path / "bands.png")
    assert t.shape == (3, 100, 200) and t.dtype == torch.float32
    assert t.min() == -1.0 and t.max() == 1.0
    assert torch.equal(t, torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1)


def test_load_image_resize_and_centre_crop(tmp_path):
    _three_bands(tmp_path / "bands.png")
    t = vio.load_image(tmp_path / "bands.png", size=(64, 64))
    assert t.shape == (3, 64, 64)
    assert t.min() >= -1.0 and t.max() <= 1.0
    inner = t[:, :, 3:-3]  # bicubic smears a couple of pixels at the band edges
    assert (inner[1] > 0.95).all() and (inner[0] < -0.95).all() and (inner[2] < -0.95).all()
    # Non-square target (width, height) order: 80 wide, 20 tall.
    wide = vio.load_image(tmp_path / "bands.png", size=(80, 20))
    assert wide.shape == (3, 20, 80)
    # Portrait source cropped to landscape keeps the vertical centre.
    arr = np.zeros((200, 100, 3), np.uint8)
    arr[80:120] = 255
    Image.fromarray(arr).save(tmp_path / "tall.png")
    t = vio.load_image(tmp_path / "tall.png", size=(50, 20))
    assert t.shape == (3, 20, 50) and (t[:, 2:-2] > 0.95).all()


def test_load_image_transparency_over_white_and_grey(tmp_path):
    Image.new("RGBA", (8, 6), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert (vio.load_image(tmp_path / "clear.png") == 1.0).all()
    Image.new("L", (8, 6), 0).save(tmp_path / "grey.png")
    g = vio.load_image(tmp_path / "grey.png")
    assert g.shape == (3, 6, 8) and (g == -1.0).all()


def test_load_image_missing_and_corrupt_name_the_path(tmp_path):
    missing = tmp_path / "no such dir" / "x.png"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        vio.load_image(missing)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not an image")
    with pytest.raises(ValueError, match=re.escape(str(junk))):
        vio.load_image(junk)
    # A real PNG cut short: opens fine (lazy), fails when the pixels are decoded.
    _three_bands(tmp_path / "full.png")
    cut = tmp_path / "cut.png"
    data = (tmp_path / "full.png").read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=re.escape(str(cut))):
        vio.load_image(cut)


def test_read_video_missing_and_corrupt_name_the_path(tmp_path):
    missing = tmp_path / "gone.mp4"
    for fn in (vio.read_video, vio.video_info):
        with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
            fn(missing)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00" * 64 + b"definitely not a video")
    with pytest.raises(ValueError, match=re.escape(str(junk))):
        vio.read_video(junk)


# ---------------------------------------------------------------- JSON sidecars

def test_json_round_trip_unicode_and_atomic(tmp_path):
    obj = {"prompt": 'über "Drache" 夜景 🐉', "seed": 42, "frames": [1, 2.5, None], "ok": True}
    path = vio.write_json_atomic(tmp_path / "sub" / "shot.json", obj)
    assert path == tmp_path / "sub" / "shot.json"
    assert vio.read_json(path) == obj
    assert "夜景 🐉" in path.read_text(encoding="utf-8")  # stored as readable UTF-8, not \u escapes
    assert json.loads(path.read_text(encoding="utf-8")) == obj
    before = path.read_bytes()
    with pytest.raises(TypeError):
        vio.write_json_atomic(path, {"bad": object()})
    assert path.read_bytes() == before and snapshot(path.parent) == ["shot.json"]
    vio.write_json_atomic(path, {"v": 2})
    assert vio.read_json(path) == {"v": 2} and snapshot(path.parent) == ["shot.json"]


def test_sidecar_path():
    assert vio.sidecar_path("out/run1/shot_003.mp4") == vio.Path("out/run1/shot_003.json")
    assert vio.sidecar_path(vio.Path("/a/b.c/x.mp4")) == vio.Path("/a/b.c/x.json")


def test_portrait_clip_that_decord_cannot_copy_still_reads(tmp_path):
    """decord fails on 48-pixel-wide frames (row not 64-byte aligned); the ffmpeg fallback reads them."""
    from renderer.video_io import extract_frames, read_video, write_mp4

    frames = np.zeros((9, 64, 48, 3), np.uint8)
    frames[:, :32] = 200  # top half bright
    path = write_mp4(frames, tmp_path / "portrait.mp4", fps=16)
    video = read_video(path)
    assert video.shape == (9, 64, 48, 3)
    assert video[:, :28].mean() > 180 and video[:, 36:].mean() < 20
    first, last = extract_frames(path, [0, -1])
    assert first.shape == last.shape == (64, 48, 3)
