"""The performer's box: YOLOv10m (the official det/yolov10m.onnx) through onnxruntime.

Signature (official preprocess, pose2d.Yolo): input [1,3,640,640] float32 RGB in [0,1], the frame squashed to
640x640 (no letterbox); output either [1,N,6] rows (x1,y1,x2,y2,score,class) in 640-space — YOLOv10's end-to-end
head — or [1,84,N] (cx,cy,w,h + 80 class scores, YOLOv8 style). Class 0 is a person. Boxes above the confidence
threshold go through NMS; the largest person box wins (official select_type='max'). A frame with no person gets
the whole frame, as the official code does, and is counted so the preview and meta can say so.
"""
from __future__ import annotations

import numpy as np

from renderer.prepare.checkpoints import DETECTOR_INPUT, open_onnx, providers_for
from renderer.prepare.errors import PrepareError

PERSON_CLASS = 0


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> list[int]:
    """Greedy non-maximum suppression on [N,4] xyxy boxes; indices kept, best first."""
    order = np.argsort(-scores)
    area = np.maximum(0, boxes[:, 2] - boxes[:, 0]) * np.maximum(0, boxes[:, 3] - boxes[:, 1])  # [N]
    keep = []
    while order.size:
        i = order[0]
        keep.append(int(i))
        xx1 = np.maximum(boxes[i, 0], boxes[order[1:], 0])
        yy1 = np.maximum(boxes[i, 1], boxes[order[1:], 1])
        xx2 = np.minimum(boxes[i, 2], boxes[order[1:], 2])
        yy2 = np.minimum(boxes[i, 3], boxes[order[1:], 3])
        inter = np.maximum(0, xx2 - xx1) * np.maximum(0, yy2 - yy1)  # [M]
        iou = inter / np.maximum(area[i] + area[order[1:]] - inter, 1e-9)
        order = order[1:][iou <= iou_threshold]
    return keep


def decode_detections(output: np.ndarray, frame_hw: tuple[int, int], input_hw=(640, 640)) -> np.ndarray:
    """Raw detector output for one image -> [N,6] (x1,y1,x2,y2,score,class) in frame pixels."""
    out = np.asarray(output, np.float32)
    if out.ndim == 3:
        out = out[0]
    h, w = frame_hw
    sx, sy = w / input_hw[1], h / input_hw[0]
    if out.ndim == 2 and out.shape[-1] == 6:  # YOLOv10 end-to-end rows
        rows = out.copy()  # [N,6]
    elif out.ndim == 2 and out.shape[0] == 84:  # YOLOv8-style [84,N] -> centre boxes + class scores
        cls_scores = out[4:].T  # [N,80]
        cx, cy, bw, bh = out[0], out[1], out[2], out[3]
        rows = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2,
                         cls_scores.max(1), cls_scores.argmax(1).astype(np.float32)], 1)  # [N,6]
    else:
        raise PrepareError(f"detector output has shape {list(np.shape(output))}; expected [1,N,6] (YOLOv10) or "
                           "[1,84,N] (YOLOv8): is det/yolov10m.onnx the right file?")
    rows[:, [0, 2]] *= sx
    rows[:, [1, 3]] *= sy
    return rows


class PersonDetector:
    def __init__(self, path, device: str = "cpu", conf: float = 0.05, iou: float = 0.5):
        self.session = open_onnx(path, "person detector (det/yolov10m.onnx)", DETECTOR_INPUT, providers_for(device))
        self.input_name = self.session.get_inputs()[0].name
        self.conf, self.iou = conf, iou
        self.path = str(path)

    @staticmethod
    def preprocess(frame: np.ndarray) -> np.ndarray:
        import cv2

        img = cv2.resize(frame, (DETECTOR_INPUT[2], DETECTOR_INPUT[1]), interpolation=cv2.INTER_LINEAR)  # [640,640,3]
        return (img.astype(np.float32) / 255.0).transpose(2, 0, 1)[None]  # [1,3,640,640]

    def select(self, rows: np.ndarray, frame_hw) -> np.ndarray | None:
        """The performer: the largest person box after the confidence threshold and NMS, as [x1,y1,x2,y2,score]."""
        h, w = frame_hw
        rows = rows[(rows[:, 4] >= self.conf) & (rows[:, 5].round() == PERSON_CLASS)]
        if not len(rows):
            return None
        rows[:, [0, 2]] = rows[:, [0, 2]].clip(0, w)
        rows[:, [1, 3]] = rows[:, [1, 3]].clip(0, h)
        rows = rows[nms(rows[:, :4], rows[:, 4], self.iou)]
        area = (rows[:, 2] - rows[:, 0]) * (rows[:, 3] - rows[:, 1])  # [K]
        best = rows[int(np.argmax(area))]
        return best[:5] if area.max() > 0 else None

    def __call__(self, frame: np.ndarray) -> tuple[np.ndarray, bool]:
        """(box [x1,y1,x2,y2,score], found): the whole frame with found=False when nobody is detected."""
        h, w = frame.shape[:2]
        raw = self.session.run(None, {self.input_name: self.preprocess(frame)})[0]
        box = self.select(decode_detections(raw, (h, w)), (h, w))
        if box is None:
            return np.array([0, 0, w, h, 0], np.float32), False
        return box.astype(np.float32), True
