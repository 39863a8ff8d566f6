"""The numbers we compare against, as data, each with its source (from /work/shared/design/anchors.md).

These are other people's figures or claims; the reports print them in their own rows, marked with their kind and
source, never as something this harness measured. `kind`:
  claim      a speed claim we were asked to reproduce (no measurement of ours or an official table behind it)
  published  a row of a published table (the official Wan2.2 README, a vendor blog)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

OFFICIAL = "official Wan2.2 README table (Wan-Video/Wan2.2, computational efficiency)"
SEED_CLAIM = "wanrender seed claim, '540 s on one 4090 vs 68 s on 8 GPUs' (design/anchors.md)"


@dataclass(frozen=True)
class Anchor:
    label: str  # the series the row belongs to (one line in the plot)
    model: str  # our model preset name
    resolution: str  # "720p" / "480p"
    gpu: str  # GPU type as the source states it
    gpus: int
    seconds: float  # end-to-end seconds for one video, as published
    kind: str  # claim | published
    source: str
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _series(label, model, res, gpu, kind, source, rows: dict[int, float], note="") -> list[Anchor]:
    return [Anchor(label, model, res, gpu, n, s, kind, source, note) for n, s in rows.items()]


ANCHORS: list[Anchor] = [
    *_series("seed claim (4090 / 8 GPUs)", "ti2v_5b", "720p", "RTX 4090 (1 GPU); 8 GPUs of unstated type", "claim",
             SEED_CLAIM, {1: 540.0, 8: 68.0},
             note="≈ the official TI2V-5B 4090 row for 1 GPU; no official row says 68 s "
                  "(8×A100 T2V-A14B 480P is 119.9 s)"),
    *_series("official T2V-A14B 720P H100", "t2v_a14b", "720p", "H100", "published", OFFICIAL,
             {1: 1041.5, 4: 288.7, 8: 155.1}, note="81 frames, 40 steps"),
    *_series("official T2V-A14B 480P H100", "t2v_a14b", "480p", "H100", "published", OFFICIAL,
             {1: 326.9, 4: 91.7, 8: 51.5}, note="81 frames, 40 steps"),
    *_series("official TI2V-5B 720P RTX 4090", "ti2v_5b", "720p", "RTX 4090", "published", OFFICIAL,
             {1: 534.7, 4: 231.3, 8: 157.2}, note="121 frames, 50 steps"),
    *_series("official T2V-A14B 480P A100", "t2v_a14b", "480p", "A100", "published", OFFICIAL, {8: 119.9}),
    *_series("Morphic I2V-A14B 720P (FA3+cache+compile)", "i2v_a14b", "720p", "H100", "published",
             "Morphic blog (Wan2.2 I2V-A14B on 8×H100)", {8: 109.0}, note="step cache: fewer forwards than 40×2"),
]


def resolution_of(size: str) -> str:
    """'1280*720' / '1280*704' / '720*1280' -> '720p'; '832*480' -> '480p'; anything else: the size itself."""
    try:
        w, h = (int(v) for v in str(size).lower().replace("x", "*").split("*"))
    except ValueError:
        return str(size)
    short = min(w, h)
    return {720: "720p", 704: "720p", 480: "480p"}.get(short, f"{w}*{h}")


def anchors_for(model: str, size: str | None = None) -> list[Anchor]:
    """The anchors for one model (and resolution, when a size is given); the seed claim goes with ti2v_5b."""
    res = resolution_of(size) if size else None
    return [a for a in ANCHORS if a.model == model and (res is None or a.resolution == res)]
