"""Preprocessing settings: one typed object built from the Hydra `prepare` config, checked before any work."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from renderer.prepare.errors import PrepareError

MODES = ("animate", "replace")


@dataclass(frozen=True)
class PrepareSettings:
    mode: str = "animate"          # animate: pose + face drive the character; replace: also mask + background
    fps: int = 30                  # the render fps (Animate renders at 30)
    area: tuple = (1280, 720)      # target area W*H; sides floored to multiples of 16, aspect kept
    retarget: bool = False         # 2-D retarget the skeleton to the reference's proportions (animate only)
    face_size: int = 512           # face crops are exactly 512 x 512 for the motion encoder
    face_scale: float = 1.3        # face box = face keypoints' box x1.3 in area
    mask_kernel: int = 7           # dilation kernel (k x k)
    mask_iterations: int = 3       # dilation iterations; 0 = the raw SAM2 mask
    mask_grid: tuple = (1, 1)      # (w_len, h_len) grid fill over the mask's box; (1, 1) = the whole box
    sam_chunk: int = 400           # frames tracked per SAM2 session
    preview_frames: int = 6        # frames on the preview sheet
    device: str = "cpu"            # onnxruntime / SAM2 device: cpu | cuda | cuda:N | auto (cuda when present)
    sam2_config: str | None = field(default=None)  # a SAM2 model yaml; None = the package's hiera-large

    @classmethod
    def from_config(cls, cfg) -> "PrepareSettings":
        d = dict(cfg)
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        for k in ("area", "mask_grid"):
            if k in known and known[k] is not None:
                known[k] = tuple(int(v) for v in known[k])
        s = cls(**known)
        s.validate()
        return s

    def resolved_device(self) -> "PrepareSettings":
        """`auto` made concrete: cuda when torch sees one, else cpu."""
        if self.device != "auto":
            return self
        import torch

        return replace(self, device="cuda" if torch.cuda.is_available() else "cpu")

    def validate(self) -> None:
        problems = []
        if self.mode not in MODES:
            problems.append(f"mode={self.mode!r}: use one of {', '.join(MODES)}")
        if not (isinstance(self.fps, int) and 1 <= self.fps <= 120):
            problems.append(f"fps={self.fps!r}: a whole number of frames per second, 1-120 (Animate renders 30)")
        if len(self.area) != 2 or min(self.area) < 16:
            problems.append(f"area={list(self.area)}: [width, height], each at least 16, e.g. [1280, 720]")
        if self.retarget and self.mode == "replace":
            problems.append("retarget=true with mode=replace: retargeting is for animation only (the character "
                            "must fit the plate's silhouette in replacement)")
        if self.mask_kernel < 1 or self.mask_iterations < 0 or min(self.mask_grid) < 1:
            problems.append(f"mask_kernel={self.mask_kernel}, mask_iterations={self.mask_iterations}, "
                            f"mask_grid={list(self.mask_grid)}: kernel >= 1, iterations >= 0, grid cells >= 1")
        if self.face_size < 16 or self.sam_chunk < 1 or self.preview_frames < 1:
            problems.append("face_size >= 16, sam_chunk >= 1 and preview_frames >= 1")
        if problems:
            raise PrepareError("prepare: " + "; ".join(problems))

    def cache_fields(self) -> dict:
        """What changes the result (device does not)."""
        d = asdict(self)
        d.pop("device")
        d["area"], d["mask_grid"] = list(self.area), list(self.mask_grid)
        return d
