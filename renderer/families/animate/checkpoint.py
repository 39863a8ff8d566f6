"""Loading the Wan2.2-Animate-14B DiT from the official folder or the diffusers repository.

Official (Wan-AI/Wan2.2-Animate-14B):
    <root>/config.json, diffusion_pytorch_model-0000N-of-00004.safetensors + .index.json   (the DiT, bf16)
    <root>/models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth, models_t5_umt5-xxl-enc-bf16.pth,
    <root>/Wan2.1_VAE.pth, relighting_lora.ckpt, google/umt5-xxl/
diffusers (Wan-AI/Wan2.2-Animate-14B-Diffusers):
    <root>/transformer/ (config.json + 15 fp32 shards + index), image_encoder/, text_encoder/, vae/, …

Our module names are the official keys. A diffusers key maps onto one official key, except the face blocks' k and v
projections (diffusers to_k + to_v = official linear1_kv, k rows first) and the motion encoder's activation biases
(diffusers [C], official [1, C, 1, 1]): `diffusers_sources` says which diffusers tensors make each of our
tensors, and the loader concatenates and reshapes them.

Rules shared with renderer/checkpoint.py: the model is built on the meta device; keys and shapes are checked from
the shard headers before any tensor is read (one error naming the folder, missing / unexpected keys, shape
mismatches); every tensor goes from its shard straight to its final dtype and device — the diffusers
transformer's fp32 tensors are cast one at a time, so the 69 GB fp32 model never exists in memory.
The official checkpoint's 14 blur-kernel buffers are accepted (and checked equal to the constant we compute).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from renderer.checkpoint import CheckpointError, _read_headers, _shard_files, mismatch_error
from renderer.families.wan22.keys import official_to_diffusers as wan_official_to_diffusers
from renderer.families.animate.face import BLUR_KEY, blur_kernel
from renderer.families.animate.model import AnimateConfig, AnimateDiT, keeps_fp32

# the backbone's keys (image k/v and img_emb included) map through wan22/keys.py; these are Animate's own
_TOP = [("motion_encoder.enc.fc.", "motion_encoder.motion_network."),
        ("motion_encoder.dec.direction.weight", "motion_encoder.motion_synthesis_weight"),
        ("face_encoder.conv1_local.conv.", "face_encoder.conv1_local."),
        ("face_encoder.conv2.conv.", "face_encoder.conv2."),
        ("face_encoder.conv3.conv.", "face_encoder.conv3.")]
_FACE = [("linear1_q.", "to_q."), ("linear2.", "to_out."), ("q_norm.", "norm_q."), ("k_norm.", "norm_k.")]
# motion encoder res block parts: official suffix -> diffusers suffix
_RES = {"conv1.0.weight": "conv1.weight", "conv1.1.bias": "conv1.act_fn.bias", "conv2.1.weight": "conv2.weight",
        "conv2.2.bias": "conv2.act_fn.bias", "skip.1.weight": "conv_skip.weight"}
_CONVS = re.compile(r"^motion_encoder\.enc\.net_app\.convs\.(\d+)\.(.*)$")
_FUSER = re.compile(r"^face_adapter\.fuser_blocks\.(\d+)\.(.*)$")


def _swap(pairs: list[tuple[str, str]], name: str) -> str | None:
    for a, b in pairs:
        if (a.endswith(".") and name.startswith(a)) or name == a:
            return b + name[len(a):]
    return None


def diffusers_sources(name: str, num_res_blocks: int) -> list[str]:
    """The diffusers WanAnimateTransformer3DModel key(s) that make our (official) key `name`.

    num_res_blocks: the motion encoder's res blocks (log2(size) − 2; 7 for 512×512 faces), so convs.{R+1} is
    the final 4×4 conv."""
    m = _FUSER.match(name)
    if m:
        i, rest = m.groups()
        if rest.startswith("linear1_kv."):
            p = rest[len("linear1_kv."):]
            return [f"face_adapter.{i}.to_k.{p}", f"face_adapter.{i}.to_v.{p}"]
        return [f"face_adapter.{i}.{_swap(_FACE, rest)}"]
    m = _CONVS.match(name)
    if m:
        i, rest = int(m.group(1)), m.group(2)
        if i == 0:
            return ["motion_encoder.conv_in." + {"0.weight": "weight", "1.bias": "act_fn.bias"}[rest]]
        if i == num_res_blocks + 1:
            return ["motion_encoder.conv_out." + rest]
        return [f"motion_encoder.res_blocks.{i - 1}.{_RES[rest]}"]
    top = _swap(_TOP, name)
    if top is not None:
        return [top]
    return [wan_official_to_diffusers(name)]  # backbone keys and names both layouts share


def to_diffusers_state(state: dict[str, torch.Tensor], num_res_blocks: int) -> dict[str, torch.Tensor]:
    """Our state dict -> diffusers' (splitting linear1_kv, flattening the [1, C, 1, 1] biases). Tests write with it."""
    out = {}
    for name, t in state.items():
        srcs = diffusers_sources(name, num_res_blocks)
        parts = t.chunk(len(srcs), dim=0) if len(srcs) > 1 else [t.flatten() if t.ndim == 4 and
                                                                  name.endswith("bias") else t]
        out.update({s: p.contiguous() for s, p in zip(srcs, parts)})
    return out


# ----------------------------------------------------------------------------------------------------------
# loading


def animate_folder(root: str | Path) -> tuple[str, Path]:
    """("official" | "diffusers", the folder holding the DiT's config.json and shards)."""
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint folder {root} does not exist: set model.checkpoint to a "
                              f"Wan2.2-Animate-14B folder")
    if (root / "transformer" / "config.json").is_file():
        return "diffusers", root / "transformer"
    if (root / "config.json").is_file():
        return "official", root
    raise CheckpointError(f"checkpoint {root} is neither the official Wan2.2-Animate-14B folder (config.json and "
                          f"*.safetensors at the root) nor a diffusers repository (transformer/config.json)")


# what a usable folder holds besides the DiT, per layout (checked by `check_animate_folder` before anything loads)
OFFICIAL_PARTS = ("models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth", "Wan2.1_VAE.pth",
                  "models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl")
DIFFUSERS_PARTS = ("image_encoder", "vae", "text_encoder", "tokenizer")


def check_animate_folder(root: str | Path) -> list[str]:
    """Every problem with a Wan2.2-Animate-14B folder that can be seen without reading a tensor (empty: usable)."""
    try:
        layout, folder = animate_folder(root)
    except CheckpointError as e:
        return [str(e)]
    parts = OFFICIAL_PARTS if layout == "official" else DIFFUSERS_PARTS
    problems = [f"{Path(root) / p} is missing ({layout} layout)" for p in parts if not (Path(root) / p).exists()]
    try:
        _shard_files(folder)
    except CheckpointError as e:
        problems.append(str(e))
    return problems


def load_animate(root: str | Path, dtype: torch.dtype = torch.bfloat16,
                 device: str | torch.device = "cpu") -> AnimateDiT:
    """The Animate DiT from either layout, tensor by tensor into `dtype` on `device`."""
    from safetensors import safe_open

    layout, folder = animate_folder(root)
    raw = json.loads((folder / "config.json").read_text())
    try:
        cfg = AnimateConfig.from_dict(raw)
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {folder}: config.json is not an Animate DiT config ({e})") from e
    with torch.device("meta"):
        model = AnimateDiT(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    res_blocks = len(model.motion_encoder.enc.net_app.convs) - 2

    headers = _read_headers(_shard_files(folder))  # key -> (shard, shape), headers only
    blur_keys = sorted(k for k in headers if layout == "official" and BLUR_KEY.match(k))
    if layout == "diffusers":
        plan = {k: diffusers_sources(k, res_blocks) for k in expected}
    else:
        plan = {k: [k] for k in expected}
    used = {s for srcs in plan.values() for s in srcs}
    missing = sorted(f"{k} (from {', '.join(s for s in srcs if s not in headers)})" if layout == "diffusers" else k
                     for k, srcs in plan.items() if any(s not in headers for s in srcs))
    unexpected = sorted(k for k in headers if k not in used and k not in blur_keys)
    mismatched = []
    for k, srcs in plan.items():
        if any(s not in headers for s in srcs):
            continue
        shapes = [headers[s][1] for s in srcs]
        numel = sum(torch.Size(s).numel() for s in shapes)
        same = shapes[0] == expected[k] if len(srcs) == 1 else False
        if not same and numel != torch.Size(expected[k]).numel():
            mismatched.append(f"{' + '.join(srcs)}: checkpoint {[list(s) for s in shapes]} vs model {list(expected[k])}")
    if missing or unexpected or mismatched:
        raise mismatch_error(f"checkpoint {folder} ({layout} layout) does not match its config.json (Animate DiT "
                             f"dim {cfg.dim}, {cfg.num_layers} layers, {cfg.num_face_blocks} face blocks):",
                             missing, unexpected, mismatched,
                             "Check that this folder is a Wan2.2-Animate-14B transformer and that every shard was "
                             "copied completely.")

    dev = torch.device(device)
    by_file: dict[Path, list[str]] = {}
    for s in sorted(used | set(blur_keys)):
        by_file.setdefault(headers[s][0], []).append(s)
    pending: dict[str, torch.Tensor] = {}  # diffusers k or v half waiting for its partner (face blocks only)
    want = {s: k for k, srcs in plan.items() for s in srcs}
    for f, keys in by_file.items():
        state = {}
        try:
            with safe_open(str(f), framework="pt", device="cpu" if dev.type == "cpu" else str(dev)) as h:
                for s in keys:
                    if s in blur_keys:
                        if not torch.allclose(h.get_tensor(s).float().cpu(), blur_kernel(), atol=1e-6):
                            raise CheckpointError(f"checkpoint {folder}: {s} is not the [1,3,3,1] blur kernel "
                                                  f"every Animate checkpoint holds")
                        continue
                    k = want[s]
                    dt = torch.float32 if keeps_fp32(k) else dtype
                    pending[s] = h.get_tensor(s).to(dt)  # one tensor at a time, straight into the render dtype
                    srcs = plan[k]
                    if all(p in pending for p in srcs):
                        state[k] = torch.cat([pending.pop(p) for p in srcs]).reshape(expected[k])
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"checkpoint shard {f} cannot be read ({e}); it is truncated or corrupt: "
                                  f"copy it again") from e
        model.load_state_dict(state, strict=False, assign=True)
        del state
    if pending:  # a k/v pair split over two shards: its halves are all read now
        raise CheckpointError(f"checkpoint {folder}: unpaired tensors {sorted(pending)[:3]}")
    return model.eval()
