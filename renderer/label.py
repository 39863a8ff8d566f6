"""The visible "AI生成草案" (AI-generated draft) label burned into every frame of a labelled render.

The font is Noto Sans CJK SC from Debian's `fonts-noto-cjk` package, installed by `make fonts` (the Makefile and
.ci/run call it) into /usr/share/fonts/opentype/noto/ — the same file on every machine. We take Debian's package
rather than a PyPI wheel because the PyPI CJK font wheels are one-person uploads without a maintained release
history, while fonts-noto-cjk is the distribution's maintained build of Google/Adobe's font. `label_style.font`
may point at any other .ttf/.otf/.ttc; a font that lacks a glyph of the text is refused (it would draw tofu boxes).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

DEFAULT_TEXT = "AI生成草案"
# (path, face index in the collection): index 2 of the Noto CJK collections is the Simplified Chinese face
FONT_CANDIDATES = (("/usr/share/fonts/opentype/noto/NotoSansCJK-Bold.ttc", 2),
                   ("/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc", 2))
POSITIONS = ("bottom-left", "bottom-right", "top-left", "top-right")
FONT_FIX = "install the font with `make fonts` (Debian fonts-noto-cjk) or set label_style.font=/path/to/cjk.ttf"


@dataclass(frozen=True)
class LabelStyle:
    text: str = DEFAULT_TEXT
    font: str | None = None  # None: the first of FONT_CANDIDATES that exists
    font_index: int | None = None  # face in a .ttc collection; None: 2 for the Noto CJK collections, else 0
    position: str = "bottom-left"
    size: float = 0.06  # text height as a fraction of the frame height (at least 10 pixels; smaller only to fit
    # the frame's width)
    margin: float = 0.02  # gap to the frame's edges, as a fraction of the frame height

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "LabelStyle":
        return cls(**{k: v for k, v in (d or {}).items() if k in cls.__dataclass_fields__ and v is not None})

    def problems(self) -> list[tuple[str, str]]:
        """(field, message) for a style that cannot be drawn — checked before any model loads."""
        out = []
        if not str(self.text).strip():
            out.append(("label_style.text", "the label text is empty: set label_style.text (default AI生成草案)"))
        if self.position not in POSITIONS:
            out.append(("label_style.position", f"unknown position {self.position!r}: use one of "
                                                f"{', '.join(POSITIONS)}"))
        if not isinstance(self.size, (int, float)) or not 0 < self.size <= 0.5:
            out.append(("label_style.size", f"must be a fraction of the frame height in (0, 0.5], got {self.size!r}"))
        if not out:
            try:
                load_font(self, 16)
            except ValueError as e:
                out.append(("label_style.font", str(e)))
        return out


def font_file(style: LabelStyle) -> tuple[str, int]:
    if style.font:
        if not Path(style.font).is_file():
            raise ValueError(f"label font {style.font} does not exist: {FONT_FIX}")
        return style.font, style.font_index or 0
    for path, index in FONT_CANDIDATES:
        if Path(path).is_file():
            return path, index if style.font_index is None else style.font_index
    raise ValueError(f"no CJK font for the label: {FONT_FIX}")


def missing_glyphs(font, text: str) -> list[str]:
    """Characters of `text` the font has no glyph for (it would draw its .notdef box instead)."""
    # A character without a glyph is drawn as the font's .notdef glyph; U+FFFF is never in a font, so its mask is
    # exactly .notdef. Any visible character whose mask equals it has no glyph of its own.
    notdef = font.getmask("\uffff")
    notdef_bytes = (notdef.size, bytes(notdef))
    out = []
    for ch in dict.fromkeys(text):
        if ch.isspace():
            continue
        m = font.getmask(ch)
        if (m.size, bytes(m)) == notdef_bytes:
            out.append(ch)
    return out



def load_font(style: LabelStyle, pixel_size: int):
    from PIL import ImageFont

    path, index = font_file(style)
    try:
        font = ImageFont.truetype(path, pixel_size, index=index)
    except OSError as e:
        raise ValueError(f"cannot load label font {path} (face {index}): {e}: {FONT_FIX}") from e
    missing = missing_glyphs(font, style.text)
    if missing:
        raise ValueError(f"font {path} has no glyph for {''.join(missing)!r} of the label {style.text!r} (it "
                         f"would draw boxes): {FONT_FIX}")
    return font


def label_box(style: LabelStyle, h: int, w: int) -> tuple[tuple[int, int, int, int], Any, tuple[int, int]]:
    """(box x0, y0, x1, y1 of the dark plate, the font, text origin) for an h×w frame."""
    from PIL import Image, ImageDraw

    px = max(10, round(h * style.size))
    pad, margin = max(1, round(h * style.size * 0.15)), max(1, round(h * style.margin))
    while True:  # shrink the text until the whole label fits the frame's width (narrow portrait clips)
        font = load_font(style, px)
        x0, y0, x1, y1 = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), style.text, font=font)
        bw, bh = (x1 - x0) + 2 * pad, (y1 - y0) + 2 * pad
        if bw <= w - 2 * margin or px <= 6:
            break
        px = max(6, min(px - 1, int(px * (w - 2 * margin) / bw)))
    left = margin if style.position.endswith("left") else max(0, w - margin - bw)
    top = margin if style.position.startswith("top") else max(0, h - margin - bh)
    return (left, top, left + bw, top + bh), font, (left + pad - x0, top + pad - y0)


def make_stamper(style: LabelStyle, h: int, w: int) -> Callable[[np.ndarray], np.ndarray]:
    """A function drawing the label on one [h,w,3] uint8 frame (white text on a dark plate: legible on any
    content). The plate and text are drawn once; each frame only gets the patch pasted."""
    from PIL import Image, ImageDraw

    box, font, origin = label_box(style, h, w)
    x0, y0, x1, y1 = box
    plate = Image.new("RGB", (x1 - x0, y1 - y0), (0, 0, 0))
    ImageDraw.Draw(plate).text((origin[0] - x0, origin[1] - y0), style.text, font=font, fill=(255, 255, 255))
    patch = np.asarray(plate)[: h - y0, : w - x0]  # [ph, pw, 3]: clipped where a tiny frame is smaller

    def stamp(frame: np.ndarray) -> np.ndarray:
        out = frame.copy()  # [h, w, 3]
        out[y0:y0 + patch.shape[0], x0:x0 + patch.shape[1]] = patch
        return out

    return stamp


def burn(frames: np.ndarray, style: LabelStyle) -> np.ndarray:
    """[F,H,W,3] uint8 -> a labelled copy."""
    stamp = make_stamper(style, frames.shape[1], frames.shape[2])
    return np.stack([stamp(f) for f in frames]) if len(frames) else frames.copy()
