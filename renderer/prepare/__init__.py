"""Preprocessing for Animate shots: a plate (the performer's footage) and a character image in, the folder the
Animate renderer takes out (src_pose.mp4, src_face.mp4, src_ref.png, [src_bg.mp4, src_mask.mp4], meta.json,
preview.png). See stage.py for the order of work and README ('Animate shots from raw footage')."""
from renderer.prepare.errors import PrepareError
from renderer.prepare.settings import PrepareSettings

__all__ = ["PrepareError", "PrepareSettings", "prepare"]


def prepare(*args, **kwargs):
    """renderer.prepare.stage.prepare, imported on first use (onnxruntime/cv2 load only when preprocessing)."""
    from renderer.prepare.stage import prepare as run

    return run(*args, **kwargs)
