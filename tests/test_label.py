"""The visible label: burned with the CJK font, read back from the MP4, and really CJK glyphs (not tofu boxes)."""
import numpy as np
import pytest
from PIL import ImageFont

from renderer.label import LabelStyle, label_box, load_font, make_stamper, missing_glyphs
from renderer.video_io import read_video, write_mp4

DEJAVU = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
H, W = 180, 320


def _ncc(a, b):
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


@pytest.fixture(scope="module")
def clip():
    y, x = np.mgrid[0:H, 0:W]
    base = np.stack([(x * 255 // W), (y * 255 // H), np.full_like(x, 90)], -1).astype(np.uint8)  # [H, W, 3]
    return np.stack([base] * 3)  # [3, H, W, 3]


def test_label_read_back_from_the_mp4_is_the_fonts_cjk_rendering(tmp_path, clip):
    style = LabelStyle()  # AI生成草案, bottom-left
    plain, labelled = tmp_path / "plain.mp4", tmp_path / "label.mp4"
    write_mp4(clip, plain, fps=16)
    write_mp4(clip, labelled, fps=16, label=make_stamper(style, H, W))
    a, b = read_video(plain), read_video(labelled)
    (x0, y0, x1, y1), font, _ = label_box(style, H, W)
    assert y1 <= H and x0 < W // 4 and y0 > H // 2  # bottom-left corner
    diff = np.abs(a.astype(int) - b.astype(int)).max(-1)  # [F, H, W]
    assert diff[:, y0:y1, x0:x1].mean() > 40  # the label region changed...
    outside = diff.copy()
    outside[:, max(0, y0 - 8):y1 + 8, max(0, x0 - 8):x1 + 8] = 0
    assert outside.max() < 30  # ...and nothing far from it (only codec noise)

    # the glyphs: the decoded patch matches the CJK font's own rendering of the text, not a tofu rendering
    decoded = b[1, y0:y1, x0:x1].mean(-1)
    reference = make_stamper(style, H, W)(clip[0])[y0:y1, x0:x1].mean(-1)
    assert _ncc(decoded, reference) > 0.9
    tofu_font = ImageFont.truetype(DEJAVU, font.size)
    assert missing_glyphs(tofu_font, style.text) == list("生成草案")
    assert missing_glyphs(font, style.text) == []
    from PIL import Image, ImageDraw

    tofu = Image.new("L", (x1 - x0, y1 - y0), 0)
    ImageDraw.Draw(tofu).text((reference.shape[1] * 0, 0), style.text, font=tofu_font, fill=255)
    tofu = np.asarray(tofu, np.float64)
    assert _ncc(decoded, tofu) < _ncc(decoded, reference) - 0.3


def test_position_size_and_text_are_configurable(clip):
    small = label_box(LabelStyle(size=0.06), H, W)[0]
    big = label_box(LabelStyle(size=0.12), H, W)[0]
    assert (big[3] - big[1]) > 1.6 * (small[3] - small[1])
    x0, y0, x1, y1 = label_box(LabelStyle(position="top-right", text="预演"), H, W)[0]
    assert y0 < H // 4 and x1 > 3 * W // 4
    out = make_stamper(LabelStyle(position="top-right", text="预演"), H, W)(clip[0])
    changed = np.argwhere((out != clip[0]).any(-1))
    assert changed[:, 0].max() < H // 2 and changed[:, 1].min() > W // 2


def test_a_font_without_the_glyphs_or_a_bad_style_is_refused():
    assert LabelStyle().problems() == []
    fields = dict(LabelStyle(font=DEJAVU).problems())
    assert "no glyph" in fields["label_style.font"] and "make fonts" in fields["label_style.font"]
    fields = dict(LabelStyle(position="middle", size=2).problems())
    assert set(fields) == {"label_style.position", "label_style.size"}
    assert load_font(LabelStyle(), 20).getname()[0] == "Noto Sans CJK SC"


def test_generate_with_a_label_font_that_lacks_cjk_exits_2(tmp_path, capsys):
    from renderer.cli import main

    rc = main(["generate", "model=tiny_t2v", "prompt=a kite", "label=true", f"label_style.font={DEJAVU}",
               f"out={tmp_path / 'o'}"])
    assert rc == 2 and "label_style.font" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_the_label_is_part_of_the_render_hash_only_when_burned():
    from renderer.output import render_hash
    from renderer.pipeline import ShotSpec
    from renderer.presets import load_preset

    spec = ShotSpec(prompt="a kite", seed=1).resolve(load_preset("tiny_t2v"))
    from kernels.settings import KernelSettings

    k = KernelSettings()
    plain = render_hash(spec, "tiny_t2v", "fp", k)
    assert render_hash(spec, "tiny_t2v", "fp", k, None, None) == plain  # unlabelled outputs keep their hash
    labelled = render_hash(spec, "tiny_t2v", "fp", k, label=LabelStyle())
    assert labelled != plain and render_hash(spec, "tiny_t2v", "fp", k, label=LabelStyle(text="预演")) != labelled


def test_the_whole_label_fits_a_narrow_portrait_frame():
    for h, w in ((64, 48), (48, 64), (720, 1280)):
        x0, y0, x1, y1 = label_box(LabelStyle(), h, w)[0]
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, (h, w)
