"""Keypoint layouts, the drawn pose video, the face box, and 2-D retargeting.

The Animate model conditions on an OpenPose-style drawing: 18 body points (nose, neck, shoulders, elbows, wrists,
hips, knees, ankles, eyes, ears) plus one toe per foot, made from the 133 COCO-WholeBody keypoints as the official
preprocess does (neck = mid-shoulders, each toe = mid big/small toe), and the two 21-point hands. Keypoints below
the confidence threshold are not drawn. The drawing code is ours; layout, limb pairs and threshold follow the
official facts.
"""
from __future__ import annotations

import colorsys

import numpy as np

# COCO-WholeBody index pairs averaged into the 20-point body (a point repeated = that keypoint itself)
BODY20_A = [0, 6, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3, 17, 20]
BODY20_B = [0, 5, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3, 18, 21]
FACE = slice(23, 91)  # the 68 face points the face box is taken from
LEFT_HAND, RIGHT_HAND = slice(91, 112), slice(112, 133)
# limbs over the 20-point body, 0-based: neck-shoulders, arms, legs, head, then ankle-toe
BODY_LIMBS = [(1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12),
              (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17), (13, 18), (10, 19)]
BODY_COLORS = [(255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
               (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
               (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85), (255, 255, 255), (255, 255, 255)]
HAND_EDGES = [(0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10), (10, 11), (11, 12),
              (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20)]
# the body points SAM2 is prompted with (official get_mask): nose, neck, shoulders, hips, knees
MASK_PROMPT_POINTS = [0, 1, 2, 5, 8, 11, 10, 13]
THRESHOLD = 0.5


def body20(kp: np.ndarray) -> np.ndarray:
    """[133,3] whole-body keypoints -> [20,3] drawn body (x, y, score)."""
    return (kp[BODY20_A] + kp[BODY20_B]) / 2  # [20,3]


def _ellipse(canvas, p, q, color, width):
    import cv2

    (x1, y1), (x2, y2) = p, q
    length = float(np.hypot(x2 - x1, y2 - y1))
    angle = float(np.degrees(np.arctan2(y2 - y1, x2 - x1)))
    poly = cv2.ellipse2Poly((int((x1 + x2) / 2), int((y1 + y2) / 2)), (int(length / 2), width), int(angle), 0, 360, 1)
    cv2.fillConvexPoly(canvas, poly, color)


def draw_pose(canvas: np.ndarray, kp: np.ndarray, threshold: float = THRESHOLD, hands: bool = True) -> np.ndarray:
    """Draw one person's skeleton ([133,3] frame-pixel keypoints) onto an [H,W,3] uint8 canvas (in place)."""
    import cv2

    h, w = canvas.shape[:2]
    width = max(int(min(h, w) / 200), 1)
    body = body20(kp)
    for (a, b), color in zip(BODY_LIMBS, BODY_COLORS):
        if body[a, 2] >= threshold and body[b, 2] >= threshold:
            _ellipse(canvas, body[a, :2], body[b, :2], tuple(int(c * 0.6) for c in color), width)
    for j, (x, y, s) in enumerate(body):
        if s >= threshold:
            cv2.circle(canvas, (int(x), int(y)), width, BODY_COLORS[j], -1)
    if hands:
        hand_width = max(width // 2, 1)
        for part in (kp[LEFT_HAND], kp[RIGHT_HAND]):
            for e, (a, b) in enumerate(HAND_EDGES):
                if part[a, 2] >= threshold and part[b, 2] >= threshold:
                    rgb = colorsys.hsv_to_rgb(e / len(HAND_EDGES), 1.0, 1.0)
                    cv2.line(canvas, tuple(int(v) for v in part[a, :2]), tuple(int(v) for v in part[b, :2]),
                             tuple(int(c * 255) for c in rgb), hand_width)
            for x, y, s in part:
                if s >= threshold:
                    cv2.circle(canvas, (int(x), int(y)), hand_width, (0, 0, 255), -1)
    return canvas


def face_box(kp: np.ndarray, frame_hw, scale: float = 1.3) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2) of the face crop: the face keypoints' box grown to `scale` times its area at the same
    aspect, widened evenly, extended three times as far up as down (the forehead), clipped to the frame
    (official get_face_bboxes)."""
    h, w = frame_hw
    pts = kp[FACE, :2]  # [68,2]
    (x0, y0), (x1, y1) = pts.min(0), pts.max(0)
    bw, bh = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
    area = bw * bh * scale
    nw, nh = np.sqrt(area * bw / bh), np.sqrt(area * bh / bw)
    dw, dh = (nw - bw) / 2, (nh - bh) / 4
    box = (max(x0 - dw, 0), max(y0 - 3 * dh, 0), min(x1 + dw, w), min(y1 + dh, h))
    bx0, by0, bx1, by1 = (int(v) for v in box)
    if bx1 - bx0 < 2 or by1 - by0 < 2:  # face off-frame: a centred square so the track keeps its length
        side = max(2, min(h, w) // 4)
        bx0, by0 = (w - side) // 2, (h - side) // 2
        bx1, by1 = bx0 + side, by0 + side
    return bx0, by0, bx1, by1


def face_crop(frame: np.ndarray, kp: np.ndarray, size: int = 512, scale: float = 1.3) -> np.ndarray:
    """The [size,size,3] face crop of one frame (the box is squashed to a square, as the official resize does)."""
    import cv2

    x0, y0, x1, y1 = face_box(kp, frame.shape[:2], scale)
    return cv2.resize(np.ascontiguousarray(frame[y0:y1, x0:x1]), (size, size), interpolation=cv2.INTER_LINEAR)


# the body as a tree from the neck: (parent, child) in the order positions are rebuilt
_TREE = [(1, 0), (0, 14), (0, 15), (14, 16), (15, 17), (1, 2), (2, 3), (3, 4), (1, 5), (5, 6), (6, 7),
         (1, 8), (8, 9), (9, 10), (10, 19), (1, 11), (11, 12), (12, 13), (13, 18)]


def _limb_lengths(body: np.ndarray) -> np.ndarray:
    return np.array([np.hypot(*(body[c, :2] - body[p, :2])) for p, c in _TREE])  # [19]


def retarget(track: np.ndarray, reference: np.ndarray, ref_hw, out_hw) -> np.ndarray:
    """2-D retargeting: give the performer's skeleton the reference's proportions.

    track [T,133,3] (plate pixels), reference [133,3] (reference-image pixels). Each limb of every frame keeps its
    direction and is rescaled by (reference limb / the performer's limb in frame 0), rebuilt outward from the neck;
    hands and face move with their wrist / nose. The whole skeleton is then mapped into out_hw so the frame-0 neck
    lands where the reference's neck is. Returns [T,133,3] in output pixels.
    """
    rh, rw = ref_hw
    oh, ow = out_hw
    ref = reference.copy()
    ref[:, 0] *= ow / rw
    ref[:, 1] *= oh / rh
    src0, ref20 = body20(track[0]), body20(ref)
    ratio = _limb_lengths(ref20) / np.maximum(_limb_lengths(src0), 1e-6)  # [19]
    ok = (src0[[c for _, c in _TREE], 2] >= THRESHOLD) & (ref20[[c for _, c in _TREE], 2] >= THRESHOLD)
    ratio = np.where(ok, ratio, np.median(ratio[ok]) if ok.any() else 1.0)
    out = track.copy()
    shift = ref20[1, :2] - src0[1, :2]  # frame-0 neck onto the reference's neck
    for t in range(len(track)):
        src = body20(track[t])
        new = src.copy()
        new[1, :2] = src[1, :2] + shift
        for (p, c), r in zip(_TREE, ratio):
            new[c, :2] = new[p, :2] + (src[c, :2] - src[p, :2]) * r
        moved = np.zeros((133, 2))
        # every whole-body point follows the body20 point it belongs to
        for j20, (a, b) in enumerate(zip(BODY20_A, BODY20_B)):
            for j in {a, b}:
                moved[j] = new[j20, :2] - src[j20, :2]
        moved[FACE] = new[0, :2] - src[0, :2]
        moved[LEFT_HAND] = new[7, :2] - src[7, :2]
        moved[RIGHT_HAND] = new[4, :2] - src[4, :2]
        for j in (19, 22):  # heels follow their toes
            moved[j] = new[18 if j == 19 else 19, :2] - src[18 if j == 19 else 19, :2]
        out[t, :, :2] = track[t, :, :2] + moved
    return out
