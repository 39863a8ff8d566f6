"""Shared pieces of the Animate tests: a tiny diffusers WanAnimateTransformer3DModel and ours with its weights."""
from __future__ import annotations

import torch

from renderer.families.animate.checkpoint import diffusers_sources
from renderer.families.animate.model import AnimateConfig, AnimateDiT

# every Animate-specific size shrunk; added_kv_proj_dim = the model dim, so image tokens take their own k/v
TINY_ANIMATE = dict(num_attention_heads=4, attention_head_dim=16, in_channels=36, latent_channels=16,
                    out_channels=16, text_dim=24, ffn_dim=96, num_layers=4, image_dim=40, added_kv_proj_dim=64,
                    motion_encoder_channel_sizes={"4": 16, "8": 16, "16": 8}, motion_encoder_size=16,
                    motion_style_dim=32, motion_dim=6, motion_encoder_dim=24, face_encoder_hidden_dim=16,
                    face_encoder_num_heads=2, inject_face_latents_blocks=2)
FACE = 16  # face crop side of the tiny config


def diffusers_animate(seed: int = 0, **overrides):
    from diffusers import WanAnimateTransformer3DModel

    torch.manual_seed(seed)
    ref = WanAnimateTransformer3DModel(**{**TINY_ANIMATE, **overrides}).eval()
    with torch.no_grad():  # no zero biases or unit norms a mis-mapped key could hide behind
        for name, p in ref.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.05)
    return ref


def num_res_blocks(model: AnimateDiT) -> int:
    return len(model.motion_encoder.enc.net_app.convs) - 2


def ours_from_diffusers(ref) -> AnimateDiT:
    model = AnimateDiT(AnimateConfig.from_dict(dict(ref.config))).eval()
    dstate = ref.state_dict()
    state = {}
    for k, v in model.state_dict().items():
        srcs = diffusers_sources(k, num_res_blocks(model))
        state[k] = torch.cat([dstate[s] for s in srcs]).reshape(v.shape)
    model.load_state_dict(state, strict=True)
    return model


def animate_inputs(latent_frames=3, hw=(6, 8), batch=1, seed=1, image_tokens=9):
    """(x, pose, face, text context, clip features) for a clip of `latent_frames` (reference included)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 36, latent_frames, *hw, generator=g)
    pose = torch.randn(batch, 16, latent_frames - 1, *hw, generator=g)
    face = torch.rand(batch, 3, 4 * (latent_frames - 2) + 1, FACE, FACE, generator=g) * 2 - 1
    context = torch.randn(batch, 7, 24, generator=g)
    clip = torch.randn(batch, image_tokens, 40, generator=g)
    return x, pose, face, context, clip


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def tiny_animate_parts(seed: int = 0):
    """(model, vae, clip encoder, ModelPreset) of conf/model/tiny_animate.yaml, random fp32 weights."""
    from renderer.encoders.clip import CLIPVisionConfig, CLIPVisionEncoder
    from renderer.families.animate.model import build_animate
    from renderer.presets import load_preset
    from renderer.vae import build_vae

    p = load_preset("tiny_animate")
    model = build_animate(p.dit, dtype=torch.float32, seed=seed)
    vae = build_vae("2.1", tiny=True, dtype=torch.float32, seed=seed)
    torch.manual_seed(seed + 1)
    clip = CLIPVisionEncoder(CLIPVisionConfig(**p.extra["clip"])).eval()
    with torch.no_grad():
        for prm in clip.parameters():
            prm.normal_(0, 0.05)
    return model, vae, clip, p


def tiny_animate_inputs(mode: str, frames: int = 15, hw=(48, 64), seed: int = 0, face: int = 16):
    from renderer.families.animate.conditioning import AnimateInputs

    g = torch.Generator().manual_seed(seed)
    H, W = hw
    r = lambda *s: torch.rand(*s, generator=g) * 2 - 1  # noqa: E731
    inp = AnimateInputs(mode, reference=r(3, H, W), pose=r(3, frames, H, W), face=r(3, frames, face, face))
    if mode == "replace":
        inp.background = r(3, frames, H, W)
        inp.mask = (torch.rand(frames, H, W, generator=g) > 0.5).float()
    return inp
