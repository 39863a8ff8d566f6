"""The character mask for replacement shots: SAM2 (the `sam2` package) video predictor prompted by body keypoints,
dilated, optionally grid-filled, and the background plate with the character blacked out.

Official facts (preprocess get_mask): the plate is tracked in chunks of 400 frames; each chunk gets positive point
prompts (nose, neck, shoulders, hips, knees) on 4 evenly spaced key frames (1 if the chunk has <= 4 frames); the
mask is dilated with a k x k box kernel (k=7, 3 iterations) and then every cell of a w_len x h_len grid over the
mask's bounding box that touches the mask is filled — with the default 1 x 1 grid that is the whole box.
SAM2 is built from its own config with OmegaConf + hydra.utils.instantiate (not sam2's global Hydra
initialisation, which would collide with our Hydra config), and its checkpoint is read with weights_only=True.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from renderer.prepare.errors import PrepareError
from renderer.prepare.skeleton import MASK_PROMPT_POINTS, THRESHOLD, body20

SAM2_CONFIG = "configs/sam2/sam2_hiera_l.yaml"  # inside the sam2 package; matches sam2/sam2_hiera_large.pt
# the official video-predictor settings (sam_utils.build_sam2_video_predictor, apply_postprocessing=True)
SAM2_VIDEO_SETTINGS = {
    "sam_mask_decoder_extra_args": {"dynamic_multimask_via_stability": True,
                                    "dynamic_multimask_stability_delta": 0.05,
                                    "dynamic_multimask_stability_thresh": 0.98},
    "binarize_mask_from_pts_for_mem_enc": True,
    "fill_hole_area": 8,
}


def _import_sam2():
    """Import sam2 without leaving its global Hydra initialisation behind (it would break our own compose)."""
    try:
        from hydra.core.global_hydra import GlobalHydra

        was_initialised = GlobalHydra.instance().is_initialized()
        import sam2  # noqa: F401  (its __init__ initialises Hydra when nobody has)
        import sam2.sam2_video_predictor  # noqa: F401
    except ImportError as e:
        raise PrepareError(f"replacement needs the sam2 package ({e}): SAM2_BUILD_CUDA=0 pip install --no-deps "
                           "sam2==1.1.0 iopath (see README, 'Preprocessing')") from e
    if not was_initialised:
        GlobalHydra.instance().clear()
    return sam2


def sam2_model_config(config=None):
    """The SAM2 video-predictor config: `config` (an OmegaConf/dict model config, for tests) or the package's
    hiera-large yaml, with the official video settings applied."""
    from omegaconf import OmegaConf

    sam2 = _import_sam2()
    if config is None:
        cfg = OmegaConf.load(str(Path(sam2.__file__).parent / SAM2_CONFIG)).model
    else:
        cfg = OmegaConf.create(OmegaConf.to_container(config, resolve=True) if OmegaConf.is_config(config)
                               else config)
    cfg._target_ = "sam2.sam2_video_predictor.SAM2VideoPredictor"
    return OmegaConf.merge(cfg, SAM2_VIDEO_SETTINGS)


def load_sam2(path, device: str = "cpu", config=None):
    """SAM2 video predictor with the checkpoint at `path` ({"model": state_dict}, read with weights_only=True).
    Missing file, unreadable file or keys that do not fit the config: one PrepareError naming the file."""
    import torch
    from hydra.utils import instantiate

    path = Path(path)
    if not path.is_file():
        raise PrepareError(f"SAM2 checkpoint not found: {path} (replacement needs sam2/sam2_hiera_large.pt in the "
                           "process_checkpoint/ folder)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated zip, non-tensor payloads refused by weights_only
        raise PrepareError(f"SAM2 checkpoint {path} is not a readable weights file: {str(e)[:200]}") from e
    state = blob.get("model") if isinstance(blob, dict) else None
    if not isinstance(state, dict):
        raise PrepareError(f"SAM2 checkpoint {path} has no 'model' state dict (keys: {list(blob)[:5] if isinstance(blob, dict) else type(blob).__name__})")
    model = instantiate(sam2_model_config(config), _recursive_=True)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches raise even when strict=False
        raise PrepareError(f"SAM2 checkpoint {path} does not fit the hiera-large config: "
                           f"{str(e).splitlines()[1].strip()[:300]}") from e
    if missing or unexpected:
        raise PrepareError(f"SAM2 checkpoint {path} does not fit the hiera-large config: {len(missing)} missing "
                           f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    return model.to(device).eval()


def key_frames(n: int) -> list[int]:
    """Frames of a chunk that get point prompts: 4 evenly spaced, or only the first for <= 4 frames."""
    count = 4 if n > 4 else 1
    return list(range(0, n, max(n // count, 1)))[:count]


def prompt_points(kp: np.ndarray) -> np.ndarray:
    """[P,2] float32 positive prompts for one frame from its [133,3] keypoints (confident points only; all eight
    if none is confident, so SAM2 always gets a prompt)."""
    body = body20(kp)[MASK_PROMPT_POINTS]  # [8,3]
    good = body[body[:, 2] >= THRESHOLD]
    return (good if len(good) else body)[:, :2].astype(np.float32)


def track_character(predictor, frames: np.ndarray, keypoints: np.ndarray, chunk: int = 400,
                    progress=None) -> np.ndarray:
    """[T,H,W] uint8 (1 = character) from SAM2 tracking over `frames` [T,H,W,3], prompted by `keypoints`
    [T,133,3]."""
    import torch
    from PIL import Image

    t, h, w = frames.shape[:3]
    masks = np.zeros((t, h, w), np.uint8)
    device = next(predictor.parameters()).device
    for start in range(0, t, chunk):
        part = frames[start:start + chunk]
        with tempfile.TemporaryDirectory(prefix="wanrender-sam2-") as tmp:
            # the predictor reads a folder of numbered JPEGs (or an MP4); high quality so edges survive
            for i, frame in enumerate(part):
                Image.fromarray(frame).save(Path(tmp) / f"{i:05d}.jpg", quality=95)
            with torch.inference_mode(), torch.autocast(device.type, enabled=device.type == "cuda",
                                                        dtype=torch.bfloat16):
                state = predictor.init_state(tmp, offload_video_to_cpu=True)
                for k in key_frames(len(part)):
                    points = prompt_points(keypoints[start + k])
                    predictor.add_new_points_or_box(state, frame_idx=k, obj_id=1, points=points,
                                                    labels=np.ones(len(points), np.int32))
                for idx, _obj_ids, logits in predictor.propagate_in_video(state):
                    masks[start + idx] = (logits[0, 0] > 0).cpu().numpy()  # [H,W]
                    if progress is not None:
                        progress(1)
                predictor.reset_state(state)
    return masks


def dilate(mask: np.ndarray, k: int = 7, iterations: int = 3) -> np.ndarray:
    """[H,W] uint8 0/1 grown by a k x k box kernel `iterations` times (official get_mask_body_img)."""
    import cv2

    if iterations <= 0:
        return mask.copy()
    return cv2.dilate(mask, np.ones((k, k), np.uint8), iterations=iterations)


def grid_fill(mask: np.ndarray, w_len: int = 1, h_len: int = 1) -> np.ndarray:
    """Fill every cell of a w_len x h_len grid over the mask's bounding box that the mask touches (official
    get_aug_mask): coarser masks leave the model room for a different silhouette. Empty masks stay empty."""
    out = mask.copy()
    ys, xs = np.nonzero(out)
    if not len(xs):
        return out
    x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
    step_w, step_h = max(int((x1 - x0) / w_len), 1), max(int((y1 - y0) / h_len), 1)
    for cx in range(x0, x1, step_w):
        for cy in range(y0, y1, step_h):
            cell = (slice(cy, min(cy + step_h, y1)), slice(cx, min(cx + step_w, x1)))
            if out[cell].any():
                out[cell] = 1
    return out


def refine(mask: np.ndarray, k: int, iterations: int, w_len: int, h_len: int) -> np.ndarray:
    if iterations <= 0:
        return mask.copy()
    return grid_fill(dilate(mask, k, iterations), w_len, h_len)


def background(frame: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The frame with the character blacked out: [H,W,3] * (1 - mask)."""
    return frame * (1 - mask[:, :, None])  # [H,W,3]
