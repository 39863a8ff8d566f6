"""Reading a preprocessed folder back as the Animate renderer's inputs (the layout of
renderer.families.animate's AnimateInputs: video tensors in [-1, 1], channels first)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from renderer.prepare.errors import PrepareError
from renderer.prepare.footage import letterbox, read_image_rgb
from renderer.prepare.stage import META, OUTPUTS


def _video(path: Path) -> torch.Tensor:
    from renderer.video_io import read_video

    frames = read_video(path)  # [F,H,W,3] uint8
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float().div_(127.5).sub_(1.0)  # [3,F,H,W]


def load_prepared(folder, mode: str | None = None) -> dict:
    """{"mode", "reference" [3,H,W], "pose" [3,F,H,W], "face" [3,F,S,S], "background" [3,F,H,W] | None,
    "mask" [F,H,W] in {0,1} | None} from a folder `wanrender prepare` wrote."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, ValueError) as e:
        raise PrepareError(f"{folder} is not a preprocessed folder ({META}: {e})") from e
    mode = mode or meta["mode"]
    missing = [f for f in OUTPUTS[mode] if not (folder / f).is_file()]
    if missing:
        raise PrepareError(f"{folder} lacks {', '.join(missing)} for mode {mode}: prepare it with mode={mode}")
    pose = _video(folder / "src_pose.mp4")
    h, w = pose.shape[-2:]
    ref = letterbox(read_image_rgb(folder / "src_ref.png"), h, w)  # [H,W,3]: the character in the pose frame
    out = {"mode": mode, "pose": pose, "face": _video(folder / "src_face.mp4"),
           "reference": torch.from_numpy(np.ascontiguousarray(ref)).permute(2, 0, 1).float() / 127.5 - 1.0,
           "background": None, "mask": None}
    if mode == "replace":
        out["background"] = _video(folder / "src_bg.mp4")
        out["mask"] = (_video(folder / "src_mask.mp4")[0] > 0).float()  # [F,H,W]: white (>mid-grey) = character
    return out


def provenance(folder) -> dict:
    """What a rendered shot's sidecar records about its preprocessing: plate hash, models, settings, cache key."""
    meta = json.loads((Path(folder) / META).read_text())
    return {"folder": str(Path(folder).resolve()), "cache_key": meta["cache_key"], "mode": meta["mode"],
            "plate": meta["plate"], "image": meta["image"], "models": meta["models"], "settings": meta["settings"],
            "frames": meta["frames"], "fps": meta["fps"], "code_version": meta.get("code_version")}


def write_shot_from_plate(frames: np.ndarray, folder, out, metadata: dict | None = None):
    """The Animate shot's final MP4: `frames` [F,H,W,3] uint8 conformed to the plate's frame count at the render fps
    and muxed with the plate's audio (renderer.prepare.audio). The plate is the one meta.json names."""
    from renderer.prepare.audio import write_with_plate

    meta = json.loads((Path(folder) / META).read_text())
    plate = Path(meta["plate"]["path"])
    if not plate.is_file():
        raise PrepareError(f"the plate {plate} that {folder} was prepared from is gone: the output needs its audio "
                           "track and length; restore it or prepare again")
    return write_with_plate(frames, plate, out, int(meta["fps"]), metadata=metadata)
