"""Synthetic footage and tiny stand-in models, for the tests and the CPU example (no real weights exist here).

- `stick_figure_plate`: a white stick figure walking across a dark plate, optionally with a sine audio track.
- `export_tiny_checkpoints`: a process_checkpoint/ folder whose files have the official names and tensor
  signatures — det/yolov10m.onnx ([1,3,640,640] -> [1,300,6]), pose2d/vitpose_h_wholebody.onnx
  ([1,3,256,192] -> [1,133,64,48]), sam2/sam2_hiera_large.pt ({"model": state_dict} of a tiny SAM2 config,
  written beside it as sam2/tiny_sam2.yaml). The tiny detector boxes the bright pixels; the tiny pose model puts
  each keypoint where the stick figure has it relative to its box, so the whole route can be checked by geometry.
Exporting needs onnx + onnxscript (the `test` extra).
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np

# joints of the figure relative to its box centre, in units of the box height (x right, y down)
FIGURE = {"head": (0.0, -0.40), "neck": (0.0, -0.28), "lsho": (0.10, -0.26), "rsho": (-0.10, -0.26),
          "lelb": (0.16, -0.10), "relb": (-0.16, -0.10), "lwri": (0.18, 0.05), "rwri": (-0.18, 0.05),
          "lhip": (0.06, 0.05), "rhip": (-0.06, 0.05), "lkne": (0.08, 0.27), "rkne": (-0.08, 0.27),
          "lank": (0.09, 0.48), "rank": (-0.09, 0.48)}
HEAD_RADIUS = 0.08
_BONES = [("head", "neck"), ("neck", "lsho"), ("neck", "rsho"), ("lsho", "lelb"), ("lelb", "lwri"),
          ("rsho", "relb"), ("relb", "rwri"), ("neck", "lhip"), ("neck", "rhip"), ("lhip", "lkne"),
          ("lkne", "lank"), ("rhip", "rkne"), ("rkne", "rank")]


def figure_center(t: int, frames: int, width: int, height: int) -> tuple[float, float]:
    """Where the figure stands in frame t: walking left to right across the middle half of the plate."""
    return width * (0.3 + 0.4 * t / max(frames - 1, 1)), height * 0.5


def draw_figure(width: int, height: int, center, figure_h: float) -> np.ndarray:
    import cv2

    img = np.full((height, width, 3), 30, np.uint8)  # [H,W,3] dark grey plate
    pts = {k: (int(center[0] + u * figure_h), int(center[1] + v * figure_h)) for k, (u, v) in FIGURE.items()}
    thick = max(2, int(figure_h * 0.04))
    for a, b in _BONES:
        cv2.line(img, pts[a], pts[b], (255, 255, 255), thick)
    cv2.circle(img, pts["head"], int(HEAD_RADIUS * figure_h), (255, 255, 255), -1)
    return img


def stick_figure_plate(path, frames: int = 12, fps: float = 24.0, size=(160, 96), audio_hz: float | None = None,
                       figure_h: float | None = None) -> Path:
    """Write a plate MP4 of `frames` frames; with audio_hz, a sine tone exactly as long as the video."""
    from renderer.video_io import ffmpeg_exe, write_mp4

    w, h = size
    fh = figure_h or h * 0.8
    video = np.stack([draw_figure(w, h, figure_center(t, frames, w, h), fh) for t in range(frames)])
    path = Path(path)
    if fps == int(fps) and audio_hz is None:
        return write_mp4(video, path, int(fps))
    silent = write_mp4(video, path.with_name(path.stem + ".silent.mp4"), max(1, round(fps)))
    cmd = [ffmpeg_exe(), "-nostdin", "-v", "error", "-y", "-i", str(silent)]
    if audio_hz is not None:
        cmd += ["-f", "lavfi", "-i", f"sine=frequency={audio_hz}:sample_rate=48000:duration={frames / fps}"]
    # re-time to the exact (possibly fractional) fps without re-encoding the picture
    cmd += ["-map", "0:v:0", "-c:v", "copy", "-bsf:v", f"setts=ts=N*(1/({fps}))/TB:duration=(1/({fps}))/TB"]
    if audio_hz is not None:
        cmd += ["-map", "1:a:0", "-c:a", "aac"]
    subprocess.run(cmd + [str(path)], check=True, capture_output=True)
    silent.unlink()
    return path


def _keypoint_template() -> np.ndarray:
    """[133,2] figure-relative positions of the 133 whole-body keypoints (units of box height)."""
    f = {k: np.array(v) for k, v in FIGURE.items()}
    head, r = f["head"], HEAD_RADIUS
    kp = np.zeros((133, 2))
    kp[0] = head + (0, 0.01)
    kp[1], kp[2] = head + (r * 0.4, -r * 0.2), head + (-r * 0.4, -r * 0.2)  # eyes
    kp[3], kp[4] = head + (r * 0.9, 0), head + (-r * 0.9, 0)  # ears
    for i, name in zip(range(5, 17), ["lsho", "rsho", "lelb", "relb", "lwri", "rwri", "lhip", "rhip", "lkne", "rkne",
                                      "lank", "rank"]):
        kp[i] = f[name]
    kp[17:20] = f["lank"] + (0.02, 0.02)
    kp[20:23] = f["rank"] + (-0.02, 0.02)
    ang = np.linspace(0, 2 * np.pi, 68, endpoint=False)
    kp[23:91] = head + np.stack([np.cos(ang), np.sin(ang)], 1) * r * 0.8  # face ring
    kp[91:112] = f["lwri"] + np.linspace(0, 0.03, 21)[:, None]
    kp[112:133] = f["rwri"] - np.linspace(0, 0.03, 21)[:, None]
    return kp


def export_tiny_checkpoints(root, sam2: bool = True) -> Path:
    """Write the tiny stand-ins under `root` with the official file names. Returns root."""
    import torch

    root = Path(root)
    (root / "det").mkdir(parents=True, exist_ok=True)
    (root / "pose2d").mkdir(parents=True, exist_ok=True)

    class BrightBoxDetector(torch.nn.Module):
        """YOLOv10 signature: one box around the bright pixels (class 0, score 0.9), a decoy of class 2, zeros."""

        def forward(self, images):  # [1,3,640,640]
            bright = (images.mean(1) > 0.5).float()  # [1,640,640]
            cols, rows = bright.amax(1), bright.amax(2)  # [1,640] each
            ar = torch.arange(640, dtype=torch.float32)
            big = torch.full_like(ar, 1e4)
            x1 = torch.where(cols > 0, ar, big).amin(1)
            x2 = torch.where(cols > 0, ar + 1, -big).amax(1)
            y1 = torch.where(rows > 0, ar, big).amin(1)
            y2 = torch.where(rows > 0, ar + 1, -big).amax(1)
            person = torch.stack([x1, y1, x2, y2, torch.full_like(x1, 0.9), torch.zeros_like(x1)], 1)  # [1,6]
            decoy = torch.stack([x1 * 0, y1 * 0, x2 * 0 + 640, y2 * 0 + 640, torch.full_like(x1, 0.95),
                                 torch.full_like(x1, 2.0)], 1)  # a bigger, surer box of another class
            rows_out = torch.cat([person, decoy], 0)[None]  # [1,2,6]
            return torch.cat([rows_out, torch.zeros(1, 298, 6)], 1)  # [1,300,6]

    class TemplatePose(torch.nn.Module):
        """ViTPose signature: fixed Gaussian heatmaps at the figure's keypoints inside the 256x192 crop."""

        def __init__(self):
            super().__init__()
            kp = _keypoint_template()  # box-height units from the box centre
            # crop = box grown 1.25 at 3:4 (height-limited figure): crop h = 1.25 * box h, w = 0.75 * crop h
            cx = 0.5 + kp[:, 0] / (1.25 * 0.75)
            cy = 0.5 + kp[:, 1] / 1.25
            ys, xs = np.mgrid[0:64, 0:48]
            hm = np.exp(-((xs[None] - cx[:, None, None] * 48) ** 2 + (ys[None] - cy[:, None, None] * 64) ** 2) / 8)
            self.register_buffer("heatmaps", torch.tensor(hm[None], dtype=torch.float32))  # [1,133,64,48]

        def forward(self, x):  # [1,3,256,192]
            return self.heatmaps + 0 * x.mean()  # the input stays in the graph, so the signature is real

    torch.onnx.export(BrightBoxDetector(), (torch.zeros(1, 3, 640, 640),), str(root / "det/yolov10m.onnx"),
                      input_names=["images"], output_names=["output0"], dynamo=False)
    torch.onnx.export(TemplatePose(), (torch.zeros(1, 3, 256, 192),), str(root / "pose2d/vitpose_h_wholebody.onnx"),
                      input_names=["input"], output_names=["output"], dynamo=False)
    if sam2:
        write_tiny_sam2(root / "sam2")
    return root


def tiny_sam2_config():
    """A SAM2 video-predictor config small enough for a CPU test (hiera with 8 channels, 128 px)."""
    from omegaconf import OmegaConf

    from renderer.prepare.mask import SAM2_CONFIG, _import_sam2

    sam2 = _import_sam2()
    m = OmegaConf.load(str(Path(sam2.__file__).parent / SAM2_CONFIG.replace("hiera_l", "hiera_t"))).model
    trunk, neck = m.image_encoder.trunk, m.image_encoder.neck
    trunk.embed_dim, trunk.stages, trunk.global_att_blocks = 8, [1, 2, 1, 1], [2]
    neck.backbone_channel_list, neck.d_model, neck.position_encoding.num_pos_feats = [64, 32, 16, 8], 32, 32
    layer = m.memory_attention.layer
    m.memory_attention.d_model, m.memory_attention.num_layers = 32, 1
    layer.d_model, layer.dim_feedforward = 32, 32
    for att in (layer.self_attention, layer.cross_attention):
        att.embedding_dim, att.feat_sizes = 32, [8, 8]
    layer.cross_attention.kv_in_dim = 16
    enc = m.memory_encoder
    enc.out_dim, enc.in_dim, enc.mask_downsampler.embed_dim = 16, 32, 32
    enc.position_encoding.num_pos_feats, enc.fuser.layer.dim, enc.fuser.num_layers = 16, 32, 1
    m.image_size = 128
    return m


def write_tiny_sam2(folder) -> Path:
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from renderer.prepare.mask import sam2_model_config

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = tiny_sam2_config()
    torch.manual_seed(0)
    model = instantiate(sam2_model_config(cfg), _recursive_=True)
    torch.save({"model": model.state_dict()}, folder / "sam2_hiera_large.pt")
    OmegaConf.save(OmegaConf.create({"model": cfg}), folder / "tiny_sam2.yaml")
    return folder / "tiny_sam2.yaml"


def write_example(folder) -> Path:
    """The CPU Animate example's inputs: plate.mp4 (stick figure, 2 s at 24 fps, sine audio), character.png, and
    process_checkpoint/ with the tiny stand-ins (sam2/tiny_sam2.yaml is their SAM2 config)."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stick_figure_plate(folder / "plate.mp4", frames=48, fps=24.0, size=(160, 96), audio_hz=440.0)
    Image.fromarray(draw_figure(96, 160, (48, 80), 120)).save(folder / "character.png")
    export_tiny_checkpoints(folder / "process_checkpoint")
    return folder


if __name__ == "__main__":  # python -m renderer.prepare.synthetic examples/animate
    import sys

    print(f"wrote {write_example(sys.argv[1] if len(sys.argv) > 1 else 'examples/animate')}")
