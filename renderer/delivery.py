"""What happens to a rendered clip on its way out: the visible label, the safety verdict's folder, the signature.

`DeliverySettings` is built once from the Hydra config (`label_style`, `safety`, `provenance`, `tier`) and travels
with the job to the render groups as a plain dict; nothing here reads process globals.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from renderer.label import LabelStyle, make_stamper
from renderer.media_provenance import SigningSettings, sign_mp4
from renderer.safety import QUARANTINE_DIR, SafetySettings


@dataclass(frozen=True)
class DeliverySettings:
    label: LabelStyle = field(default_factory=LabelStyle)
    signing: SigningSettings = field(default_factory=SigningSettings)
    safety: SafetySettings = field(default_factory=SafetySettings)
    tier: str = "exact"
    label_all: bool = False  # the config's `label: true`: every shot of the job is labelled

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "DeliverySettings":
        d = d or {}
        return cls(label=LabelStyle.from_dict(d.get("label")), signing=SigningSettings.from_dict(d.get("signing")),
                   safety=SafetySettings.from_dict(d.get("safety")), tier=str(d.get("tier") or "exact"),
                   label_all=bool(d.get("label_all", False)))

    @classmethod
    def from_plain(cls, d: dict[str, Any]) -> "DeliverySettings":
        """From the whole config as plain data (nodes label_style, provenance, safety; keys label, tier)."""
        return cls.from_dict({"label": d.get("label_style"), "signing": d.get("provenance"), "safety": d.get("safety"),
                              "tier": d.get("tier"), "label_all": bool(d.get("label", False))})

    @classmethod
    def from_config(cls, cfg) -> "DeliverySettings":
        """From the composed Hydra config (renderer.settings.Settings carries the same object as `delivery`)."""
        from omegaconf import OmegaConf

        return cls.from_plain(OmegaConf.to_container(cfg, resolve=True))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def problems(self, labelled: bool) -> list[tuple[str, str]]:
        """Every (field, message) that would stop delivery, found before any model loads."""
        return (self.label.problems() if labelled else []) + self.signing.problems() + self.safety.problems()


def delivery_folder(out_dir: str | Path, held: bool) -> Path:
    """<out>/ for a delivered clip, <out>/quarantine/ for one the safety gate holds."""
    return Path(out_dir) / QUARANTINE_DIR if held else Path(out_dir)


def write_delivered(frames: np.ndarray, mp4: Path, fps: int, metadata: dict[str, str], record: dict[str, Any],
                    delivery: DeliverySettings, labelled: bool) -> bool:
    """Label (optionally), encode and sign (when the studio's key is configured) `frames` to `mp4`. The final
    name appears only when everything succeeded. Returns whether a C2PA manifest was embedded."""
    from renderer.video_io import write_mp4

    stamp = make_stamper(delivery.label, frames.shape[1], frames.shape[2]) if labelled else None
    if not delivery.signing.enabled:
        write_mp4(frames, mp4, fps=fps, metadata=metadata, label=stamp)
        return False
    unsigned = mp4.with_name(f".{mp4.stem}.unsigned-{os.getpid()}-{uuid.uuid4().hex[:8]}.mp4")
    try:
        write_mp4(frames, unsigned, fps=fps, metadata=metadata, label=stamp)
        sign_mp4(unsigned, mp4, record, delivery.signing)
    finally:
        unsigned.unlink(missing_ok=True)
    return True
