"""The preview sheet: sampled frames with keypoints, box and mask drawn, beside the pose frame and the face crop,
so an artist can check the preprocessing before any GPU time is spent."""
from __future__ import annotations

import numpy as np

from renderer.prepare.skeleton import THRESHOLD, face_box


def sample_indices(n: int, count: int) -> list[int]:
    return sorted(set(np.linspace(0, n - 1, min(count, n)).round().astype(int).tolist()))


def annotate(frame: np.ndarray, kp: np.ndarray, box: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """A copy of `frame` with the mask tinted red, the person box, the face box and the confident keypoints."""
    import cv2

    out = frame.copy()
    if mask is not None:
        tint = out.astype(np.float32)  # [H,W,3]
        tint[mask > 0] = tint[mask > 0] * 0.5 + np.array([255, 0, 0], np.float32) * 0.5
        out = tint.astype(np.uint8)
    r = max(1, min(out.shape[:2]) // 100)
    x1, y1, x2, y2 = (int(v) for v in box[:4])
    cv2.rectangle(out, (x1, y1), (x2, y2), (0, 255, 0), r)
    fx1, fy1, fx2, fy2 = face_box(kp, out.shape[:2])
    cv2.rectangle(out, (fx1, fy1), (fx2, fy2), (255, 255, 0), r)
    for x, y, s in kp:
        if s >= THRESHOLD:
            cv2.circle(out, (int(x), int(y)), r, (255, 0, 255), -1)
    return out


def preview_sheet(frames, keypoints, boxes, pose_frames, face_frames, masks=None, count: int = 6,
                  thumb_h: int = 160) -> np.ndarray:
    """[rows*thumb_h, cols*W, 3] uint8: one column per sampled frame; rows = annotated plate, pose, face."""
    from PIL import Image

    def thumb(img):
        h, w = img.shape[:2]
        return np.asarray(Image.fromarray(img).resize((max(1, round(w * thumb_h / h)), thumb_h)))

    cols = []
    for i in sample_indices(len(frames), count):
        tiles = [thumb(annotate(frames[i], keypoints[i], boxes[i], None if masks is None else masks[i])),
                 thumb(pose_frames[i]), thumb(face_frames[i])]
        width = max(t.shape[1] for t in tiles)
        col = np.zeros((thumb_h * len(tiles), width + 4, 3), np.uint8)  # 4 px gutter between columns
        for r, t in enumerate(tiles):
            col[r * thumb_h:(r + 1) * thumb_h, :t.shape[1]] = t
        cols.append(col)
    return np.concatenate(cols, axis=1)
