"""Shared pieces of the DiT tests: tiny diffusers reference models and our model with the same weights."""
from __future__ import annotations

import torch

from renderer.families.wan22.keys import diffusers_to_official
from renderer.families.wan22.model import DiTConfig, WanDiT

TINY = {
    "t2v": dict(in_channels=16, out_channels=16),
    "i2v": dict(in_channels=36, out_channels=16),
    "ti2v": dict(in_channels=48, out_channels=48),
}


def diffusers_tiny(task: str, seed: int = 0, heads: int = 4, head_dim: int = 16, layers: int = 2,
                   image_dim: int | None = None):
    """image_dim: CLIP feature width, giving the model an image embedder and image k/v (Wan2.1-i2v / Animate)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    image = dict(image_dim=image_dim, added_kv_proj_dim=heads * head_dim) if image_dim else {}
    ref = WanTransformer3DModel(num_attention_heads=heads, attention_head_dim=head_dim, text_dim=24, ffn_dim=96,
                                num_layers=layers, **TINY[task], **image).eval()
    # diffusers zero-initialises nothing we would notice, but give every bias some value so a mis-mapped
    # bias cannot hide behind zeros
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    return ref


def ours_from_diffusers(ref) -> WanDiT:
    model = WanDiT(DiTConfig.from_dict(dict(ref.config))).eval()
    state = {diffusers_to_official(k): v for k, v in ref.state_dict().items()}
    model.load_state_dict(state, strict=True)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()
