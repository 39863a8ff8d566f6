"""Whole-body keypoints: ViTPose-H whole-body (the official pose2d/vitpose_h_wholebody.onnx) through onnxruntime.

Signature (official preprocess, pose2d.ViTPose): input [1,3,256,192] float32, the person box grown by 1.25 to the
model's 3:4 aspect, cropped and resized, normalised with the ImageNet mean/std; output heatmaps [1,133,64,48]
(COCO-WholeBody order: 0-16 body, 17-22 feet, 23-90 face, 91-111 left hand, 112-132 right hand). Decoding is the
heatmap argmax refined by DARK (Gaussian-modulated heatmap, second-order Taylor step), mapped back through the crop.

Why ONNX ViTPose and not rtmlib: the Animate model was trained on poses drawn from exactly these two official
checkpoints (YOLOv10m + ViTPose-H whole-body); rtmlib's RTMW/DWPose give different keypoints (and different
confidence calibration), which shifts the drawn skeleton the model conditions on. The ONNX route also needs only
onnxruntime, which is already our detector's runtime.
"""
from __future__ import annotations

import numpy as np

from renderer.prepare.checkpoints import POSE_INPUT, POSE_KEYPOINTS, open_onnx, providers_for
from renderer.prepare.errors import PrepareError

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
BOX_GROWTH = 1.25  # official bbox_from_detector rescale
DARK_KERNEL = 11  # Gaussian modulation kernel (sigma 2), official default


def crop_box(box: np.ndarray, frame_hw, input_hw=(256, 192)) -> tuple[np.ndarray, np.ndarray]:
    """(center [2], size [2] = crop width, height in frame pixels) for a person box [x1,y1,x2,y2,score].
    A missing or tiny box (score <= 0, side < 10 px) means the whole frame, as in the official code."""
    h, w = frame_hw
    x1, y1, x2, y2, score = [float(v) for v in box[:5]]
    if score <= 0 or x2 - x1 < 10 or y2 - y1 < 10:
        x1, y1, x2, y2 = 0.0, 0.0, float(w), float(h)
    aspect = input_hw[0] / input_hw[1]  # height / width of the model input
    side = max((x2 - x1) * aspect, y2 - y1) * BOX_GROWTH  # crop height
    return np.array([(x1 + x2) / 2, (y1 + y2) / 2]), np.array([side / aspect, side])


def crop_input(frame: np.ndarray, center: np.ndarray, size: np.ndarray, input_hw=(256, 192)) -> np.ndarray:
    """The crop [center ± size/2] resized to the model input, normalised: [3,H,W] float32 (outside = black)."""
    import cv2

    ih, iw = input_hw
    sx, sy = iw / size[0], ih / size[1]
    affine = np.array([[sx, 0, iw / 2 - center[0] * sx], [0, sy, ih / 2 - center[1] * sy]], np.float32)
    crop = cv2.warpAffine(frame, affine, (iw, ih), flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0))  # [ih,iw,3]
    return ((crop.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)  # [3,ih,iw]


def _gaussian_modulate(heatmaps: np.ndarray, kernel: int) -> np.ndarray:
    """Blur each [H,W] map with a zero border and rescale to its original maximum (DARK's modulation)."""
    import cv2

    border = (kernel - 1) // 2
    out = np.empty_like(heatmaps)
    for k, hm in enumerate(heatmaps):
        padded = np.pad(hm, border)  # [H+2b, W+2b]
        blurred = cv2.GaussianBlur(padded, (kernel, kernel), 0)[border:-border, border:-border]
        peak = blurred.max()
        out[k] = blurred * (hm.max() / peak) if peak > 0 else blurred
    return out


def decode_heatmaps(heatmaps: np.ndarray, center: np.ndarray, size: np.ndarray, dark: bool = True) -> np.ndarray:
    """[K,h,w] heatmaps of one crop -> [K,3] (x, y, score) in frame pixels."""
    heatmaps = np.asarray(heatmaps, np.float32)
    k, h, w = heatmaps.shape
    flat = heatmaps.reshape(k, -1)  # [K,h*w]
    idx = flat.argmax(1)
    score = flat.max(1)  # [K]
    xy = np.stack([idx % w, idx // w], 1).astype(np.float64)  # [K,2] heatmap coords
    if dark:
        logs = np.log(np.maximum(_gaussian_modulate(heatmaps, DARK_KERNEL), 1e-10))  # [K,h,w]
        for j in range(k):
            px, py = int(xy[j, 0]), int(xy[j, 1])
            if score[j] <= 0 or not (1 < px < w - 2 and 1 < py < h - 2):
                continue
            m = logs[j]
            dx = 0.5 * (m[py, px + 1] - m[py, px - 1])
            dy = 0.5 * (m[py + 1, px] - m[py - 1, px])
            dxx = 0.25 * (m[py, px + 2] - 2 * m[py, px] + m[py, px - 2])
            dyy = 0.25 * (m[py + 2, px] - 2 * m[py, px] + m[py - 2, px])
            dxy = 0.25 * (m[py + 1, px + 1] - m[py - 1, px + 1] - m[py + 1, px - 1] + m[py - 1, px - 1])
            det = dxx * dyy - dxy * dxy
            if det != 0:
                hess_inv = np.array([[dyy, -dxy], [-dxy, dxx]]) / det
                xy[j] -= hess_inv @ np.array([dx, dy])
    # heatmap -> frame: one heatmap cell is size / (w, h) frame pixels, the crop centred on `center`
    out = np.empty((k, 3), np.float32)
    out[:, 0] = xy[:, 0] * (size[0] / w) + center[0] - size[0] / 2
    out[:, 1] = xy[:, 1] * (size[1] / h) + center[1] - size[1] / 2
    out[:, 2] = score
    return out


class WholeBodyPose:
    def __init__(self, path, device: str = "cpu"):
        self.session = open_onnx(path, "whole-body pose model (pose2d/vitpose_h_wholebody.onnx)", POSE_INPUT,
                                 providers_for(device))
        self.input_name = self.session.get_inputs()[0].name
        out_shape = list(self.session.get_outputs()[0].shape)
        if len(out_shape) != 4 or (isinstance(out_shape[1], int) and out_shape[1] != POSE_KEYPOINTS):
            raise PrepareError(f"whole-body pose model {path} outputs {out_shape}; expected heatmaps "
                               f"[1,{POSE_KEYPOINTS},64,48] — is this the whole-body (133 keypoint) ViTPose?")
        self.path = str(path)

    def __call__(self, frame: np.ndarray, box: np.ndarray) -> np.ndarray:
        """Keypoints [133,3] (x, y, score) in frame pixels for the person in `box`."""
        center, size = crop_box(box, frame.shape[:2], POSE_INPUT[1:])
        x = crop_input(frame, center, size, POSE_INPUT[1:])[None]  # [1,3,256,192]
        heatmaps = self.session.run(None, {self.input_name: x})[0][0]  # [133,64,48]
        return decode_heatmaps(heatmaps, center, size)
