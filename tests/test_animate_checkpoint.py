"""Animate DiT checkpoints written by the test in the official and diffusers layouts, loaded back."""
import json

import pytest
import torch
from safetensors.torch import save_file

from renderer.checkpoint import CheckpointError
from renderer.families.animate.checkpoint import load_animate, to_diffusers_state
from renderer.families.animate.face import blur_kernel
from tests.animate_helpers import animate_inputs, diffusers_animate, num_res_blocks, ours_from_diffusers, rel_err


def _shards(folder, state, n=2, fp32=False):
    """Write `state` as n safetensors shards + index (the layout both releases use)."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(state)
    weight_map = {}
    for i in range(n):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: (state[k].float() if fp32 else state[k]).contiguous() for k in keys[i::n]}
        save_file(part, str(folder / name))
        weight_map.update({k: name for k in part})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def _official(tmp_path, ours, blur=True):
    root = tmp_path / "Wan2.2-Animate-14B"
    state = dict(ours.state_dict())
    if blur:  # the official checkpoint's 14 fixed blur buffers (2 per motion-encoder res block)
        for i in range(1, num_res_blocks(ours) + 1):
            for part in ("conv2", "skip"):
                state[f"motion_encoder.enc.net_app.convs.{i}.{part}.0.kernel"] = blur_kernel()
    _shards(root, state)
    cfg = ours.cfg.to_dict() | {"motion_encoder_dim": ours.cfg.motion_out_dim, "_class_name": "WanAnimateModel"}
    cfg["motion_channels"] = {str(k): v for k, v in dict(ours.cfg.motion_channels).items()}
    (root / "config.json").write_text(json.dumps(cfg))
    return root


def _diffusers(tmp_path, ref, ours):
    root = tmp_path / "Wan2.2-Animate-14B-Diffusers"
    _shards(root / "transformer", to_diffusers_state(ours.state_dict(), num_res_blocks(ours)), n=3, fp32=True)
    (root / "transformer" / "config.json").write_text(json.dumps(dict(ref.config)))
    return root


def _forward(model, seed=2):
    x, pose, face, context, clip = animate_inputs(seed=seed)
    with torch.no_grad():
        return model(x, torch.tensor([600.0]), context, image_features=clip, pose=pose, face=face)


@pytest.mark.parametrize("layout", ["official", "diffusers"])
def test_round_trip(tmp_path, layout):
    ref = diffusers_animate(seed=5)
    ours = ours_from_diffusers(ref)
    root = _official(tmp_path, ours) if layout == "official" else _diffusers(tmp_path, ref, ours)
    loaded = load_animate(root, dtype=torch.float32)
    for k, v in ours.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert rel_err(_forward(loaded), _forward(ours)) <= 1e-6


def test_diffusers_fp32_loads_straight_into_bf16(tmp_path):
    ref = diffusers_animate(seed=6)
    ours = ours_from_diffusers(ref)
    loaded = load_animate(_diffusers(tmp_path, ref, ours), dtype=torch.bfloat16)
    dtypes = {k: v.dtype for k, v in loaded.state_dict().items()}
    assert dtypes["blocks.0.self_attn.q.weight"] == torch.bfloat16
    assert dtypes["face_adapter.fuser_blocks.0.linear1_kv.weight"] == torch.bfloat16
    assert dtypes["blocks.0.modulation"] == torch.float32  # the fp32 set stays fp32
    assert dtypes["motion_encoder.dec.direction.weight"] == torch.float32  # the motion basis is QR'd in fp32
    assert not any(v.is_meta for v in loaded.state_dict().values())


def test_mismatched_folder_fails_before_reading(tmp_path):
    ref = diffusers_animate(seed=7)
    ours = ours_from_diffusers(ref)
    root = _official(tmp_path, ours)
    cfg = json.loads((root / "config.json").read_text())
    cfg["num_layers"] = 6  # the folder holds 4 blocks
    (root / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"missing keys \(\d+\): blocks\.4\."):
        load_animate(root)
    with pytest.raises(CheckpointError, match="neither the official Wan2.2-Animate-14B folder"):
        load_animate(tmp_path)


def test_wrong_blur_buffer_is_refused(tmp_path):
    ours = ours_from_diffusers(diffusers_animate(seed=8))
    root = tmp_path / "bad"
    state = dict(ours.state_dict())
    state["motion_encoder.enc.net_app.convs.1.conv2.0.kernel"] = torch.ones(4, 4)
    _shards(root, state, n=1)
    (root / "config.json").write_text((_official(tmp_path, ours) / "config.json").read_text())
    with pytest.raises(CheckpointError, match="is not the \\[1,3,3,1\\] blur kernel"):
        load_animate(root)
