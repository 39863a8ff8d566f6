"""The preprocessing checkpoints (official `process_checkpoint/` layout) and their up-front checks.

    <root>/det/yolov10m.onnx                 person detector, input [1,3,640,640]
    <root>/pose2d/vitpose_h_wholebody.onnx   whole-body pose, input [1,3,256,192], heatmaps [1,133,64,48]
    <root>/sam2/sam2_hiera_large.pt          SAM2 hiera-large (replacement mode only), {"model": state_dict}

Every file is opened and its tensor names/shapes checked before a single frame of the plate is decoded, so a
missing or wrong checkpoint costs a second, not a decode of the whole plate.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from renderer.prepare.errors import PrepareError

DETECTOR_FILE = "det/yolov10m.onnx"
POSE_FILE = "pose2d/vitpose_h_wholebody.onnx"
SAM2_FILE = "sam2/sam2_hiera_large.pt"

DETECTOR_INPUT = (3, 640, 640)  # C, H, W after the batch dimension
POSE_INPUT = (3, 256, 192)
POSE_KEYPOINTS = 133  # COCO-WholeBody: 17 body, 6 feet, 68 face, 2 x 21 hands


@dataclass(frozen=True)
class CheckpointPaths:
    detector: Path
    pose: Path
    sam2: Path | None  # None in animation mode: no mask is needed

    @classmethod
    def under(cls, root, replace: bool) -> "CheckpointPaths":
        if root is None or str(root) in ("", "None"):
            raise PrepareError("prepare.checkpoint is not set: point it at the official process_checkpoint/ folder "
                               f"(holding {DETECTOR_FILE}, {POSE_FILE}" + (f", {SAM2_FILE})" if replace else ")"))
        root = Path(root)
        return cls(detector=root / DETECTOR_FILE, pose=root / POSE_FILE, sam2=root / SAM2_FILE if replace else None)

    def fingerprint(self) -> dict[str, str]:
        """A cheap content fingerprint of each file (size + hash of its first and last MiB): enough to tell two
        checkpoints apart for the cache key without reading 900 MB of SAM2 every submission."""
        out = {}
        for name, p in (("detector", self.detector), ("pose", self.pose), ("sam2", self.sam2)):
            if p is not None:
                out[name] = file_fingerprint(p)
        return out


def file_fingerprint(path: Path, block: int = 1 << 20) -> str:
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(block))
        if size > block:
            f.seek(max(block, size - block))
            h.update(f.read(block))
    return h.hexdigest()[:16]


def _dims_match(shape, expect) -> bool:
    # ONNX dims may be symbolic (a str or None) where the exporter left them dynamic: those match anything
    return len(shape) == len(expect) and all(not isinstance(s, int) or s == e for s, e in zip(shape, expect))


def open_onnx(path: Path, role: str, expect_input: tuple, providers: list[str]):
    """An onnxruntime session for `path` after checking it exists, parses and takes [N, *expect_input]."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise PrepareError("onnxruntime is not installed: pip install 'wanrender[prepare]'") from e
    path = Path(path)
    if not path.is_file():
        raise PrepareError(f"{role} checkpoint not found: {path} (download the official process_checkpoint/ "
                           "folder and point prepare.checkpoint at it)")
    try:
        session = ort.InferenceSession(str(path), providers=providers)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf types
        raise PrepareError(f"{role} checkpoint {path} is not a readable ONNX model: {str(e)[:300]}") from e
    inputs = session.get_inputs()
    shape = list(inputs[0].shape)
    if len(inputs) != 1 or not _dims_match(shape[1:], expect_input):
        got = [(i.name, i.shape) for i in inputs]
        raise PrepareError(f"{role} checkpoint {path} takes {got}; expected one input [1,{','.join(map(str, expect_input))}] "
                           f"— is this the right file for {role}?")
    return session


def providers_for(device: str) -> list[str]:
    """onnxruntime execution providers for a device string ('cpu', 'cuda', 'cuda:1')."""
    if device.startswith("cuda"):
        idx = device.split(":")[1] if ":" in device else "0"
        return [("CUDAExecutionProvider", {"device_id": idx}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]
