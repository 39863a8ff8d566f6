"""The CLIP ViT-H/14 image encoder Wan2.2-Animate (and Wan2.1 I2V) conditions on, in plain PyTorch.

The official model is open-clip's xlm-roberta-large-vit-huge-14; Animate uses only its vision tower, and only the
output of the first 31 of its 32 blocks (no final block, no post-norm, no pooling): 257 tokens × 1280 for a
224×224 image. We build just those 31 blocks, so the last block, the text tower and the heads are never loaded.

Module names follow the official checkpoint (models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth) with the
"visual." prefix removed; `hf_to_official` maps transformers' CLIPVisionModel names (the diffusers repository's
image_encoder/) onto them.

Preprocessing (`preprocess`):
  "official"  the reference image, in [-1, 1], squashed to 224×224 with bicubic interpolation (no crop, no
              antialias), then the CLIP mean/std — what wan/modules/animate/clip.py does;
  "diffusers" transformers' CLIPImageProcessor: shortest side to 224 (PIL bicubic), centre crop, mean/std —
              what diffusers' WanAnimatePipeline does. Offered for the parity tests; it crops a non-square image.

Shapes: B images, P = (224/14)² = 256 patches, L = P + 1 tokens (class token first), D width, Hn heads.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.attention import attention

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESS = ("official", "diffusers")


@dataclass(frozen=True)
class CLIPVisionConfig:
    image_size: int = 224
    patch_size: int = 14
    dim: int = 1280
    mlp_ratio: float = 4.0
    num_heads: int = 16
    num_layers: int = 32  # of the checkpoint; we run num_layers − 1 of them
    eps: float = 1e-5

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


class CLIPAttention(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.to_qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.to_qkv(x).unflatten(-1, (3, self.num_heads, -1)).unbind(2)  # 3 × [B, L, Hn, Dh]
        return self.proj(attention(q, k, v).flatten(-2))  # [B, L, D]


class CLIPBlock(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        hidden = int(cfg.dim * cfg.mlp_ratio)
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.attn = CLIPAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, hidden), nn.GELU(), nn.Linear(hidden, cfg.dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(_ln(self.norm1, x))  # [B, L, D]
        return x + self.mlp(_ln(self.norm2, x))  # [B, L, D]


def _ln(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm in fp32, back to x's dtype (as the reference)."""
    return F.layer_norm(x.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps).to(x.dtype)


class CLIPVisionEncoder(nn.Module):
    """Pixels -> the hidden states after block num_layers − 1 (the penultimate block): [B, L, D]."""

    def __init__(self, cfg: CLIPVisionConfig = CLIPVisionConfig()):
        super().__init__()
        self.cfg = cfg
        p, d = cfg.patch_size, cfg.dim
        self.patch_embedding = nn.Conv2d(3, d, kernel_size=p, stride=p, bias=False)  # pre-norm ViT: no bias
        self.cls_embedding = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embedding = nn.Parameter(torch.zeros(1, cfg.num_tokens, d))
        self.pre_norm = nn.LayerNorm(d, eps=cfg.eps)
        self.transformer = nn.Sequential(*[CLIPBlock(cfg) for _ in range(cfg.num_layers - 1)])

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: [B, 3, S, S] already normalised (see `preprocess`) -> [B, L, D] in the model dtype."""
        s = self.cfg.image_size
        if pixels.shape[-2:] != (s, s):
            raise ValueError(f"CLIP input is {tuple(pixels.shape[-2:])}, the encoder takes {s}×{s}: preprocess it")
        x = self.patch_embedding(pixels.to(self.dtype)).flatten(2).transpose(1, 2)  # [B, P, D]
        x = torch.cat([self.cls_embedding.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)  # [B, L, D]
        x = _ln(self.pre_norm, x + self.pos_embedding.to(x.dtype))  # [B, L, D]
        return self.transformer(x)  # [B, L, D]

    @torch.no_grad()
    def encode(self, image: torch.Tensor, preprocess: str = "official") -> torch.Tensor:
        """image: [B, 3, H, W] in [-1, 1] -> [B, L, D] fp32 CLIP features."""
        return self.forward(preprocess_image(image, self.cfg.image_size, preprocess)).float()


def preprocess_image(image: torch.Tensor, size: int = 224, mode: str = "official") -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> [B, 3, size, size] CLIP-normalised fp32 (modes: see the module docstring)."""
    if mode not in PREPROCESS:
        raise ValueError(f"unknown CLIP preprocessing {mode!r}: choose one of {', '.join(PREPROCESS)}")
    mean = torch.tensor(CLIP_MEAN, device=image.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=image.device).view(1, 3, 1, 1)
    if mode == "official":
        x = F.interpolate(image.float(), size=(size, size), mode="bicubic", align_corners=False)  # [B, 3, S, S]
        return (x * 0.5 + 0.5 - mean) / std
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                              image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    u8 = ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = proc(images=list(u8), return_tensors="pt")["pixel_values"]  # [B, 3, S, S]
    return out.to(image.device)


# ----------------------------------------------------------------------------------------------------------
# checkpoints

# keys of the official .pth we do not build: the text tower, the logit scale, the last block, post-norm, head
_SKIP = re.compile(r"^(textual\.|log_scale$|visual\.post_norm\.|visual\.head$|visual\.head\.)")
_HF_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.*)$")
_HF_LAYER_MAP = {"layer_norm1.": "norm1.", "layer_norm2.": "norm2.", "self_attn.out_proj.": "attn.proj.",
                 "mlp.fc1.": "mlp.0.", "mlp.fc2.": "mlp.2."}


class CLIPCheckpointError(ValueError):
    pass


def official_state(raw: dict[str, torch.Tensor], cfg: CLIPVisionConfig) -> dict[str, torch.Tensor]:
    """The official open-clip state dict (whole model) -> our vision encoder's state dict."""
    last = f"visual.transformer.{cfg.num_layers - 1}."
    return {k[len("visual."):]: v for k, v in raw.items()
            if k.startswith("visual.") and not _SKIP.match(k) and not k.startswith(last)}


def hf_to_official(raw: dict[str, torch.Tensor], cfg: CLIPVisionConfig) -> dict[str, torch.Tensor]:
    """transformers CLIPVisionModel state dict -> ours (q/k/v fused into to_qkv, embeddings reshaped)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in raw.items():
        k = k.removeprefix("vision_model.")  # saved files carry the prefix; transformers 5's module does not
        m = _HF_LAYER.match(k)
        if m:
            i, rest = int(m.group(1)), m.group(2)
            if i >= cfg.num_layers - 1:
                continue
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                qkv.setdefault(f"transformer.{i}.attn.to_qkv.{rest.split('.')[-1]}", {})[rest.split(".")[1]] = v
                continue
            for a, b in _HF_LAYER_MAP.items():
                if rest.startswith(a):
                    out[f"transformer.{i}.{b}{rest[len(a):]}"] = v
            continue
        name = {"embeddings.class_embedding": "cls_embedding",
                "embeddings.patch_embedding.weight": "patch_embedding.weight",
                "embeddings.position_embedding.weight": "pos_embedding",
                "pre_layrnorm.weight": "pre_norm.weight", "pre_layrnorm.bias": "pre_norm.bias"}.get(k)
        if name == "cls_embedding":
            v = v.view(1, 1, -1)
        elif name == "pos_embedding":
            v = v.unsqueeze(0)
        if name is not None:
            out[name] = v
    for name, parts in qkv.items():
        out[name] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]])
    return out


def load_clip(path: str | Path, dtype: torch.dtype = torch.float16, device: str | torch.device = "cpu",
              cfg: CLIPVisionConfig = CLIPVisionConfig()) -> CLIPVisionEncoder:
    """The vision encoder from the official .pth (torch.load(weights_only=True)) or a transformers
    CLIPVisionModel folder (config.json + safetensors: the diffusers repository's image_encoder/)."""
    path = Path(path)
    if path.is_dir():
        from safetensors.torch import load_file

        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CLIPCheckpointError(f"CLIP folder {path} holds no .safetensors files")
        raw = {}
        for f in files:
            raw.update(load_file(str(f)))
        state = hf_to_official(raw, cfg)
    elif path.is_file():
        try:
            raw = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise CLIPCheckpointError(f"CLIP checkpoint {path} cannot be read with weights_only=True ({e})") from e
        state = official_state(raw, cfg)
    else:
        raise CLIPCheckpointError(f"CLIP checkpoint {path} does not exist: expected "
                                  f"models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth or image_encoder/")
    with torch.device("meta"):
        model = CLIPVisionEncoder(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad = sorted(f"{k}: {list(state[k].shape)} vs {list(s)}" for k, s in expected.items()
                 if k in state and tuple(state[k].shape) != s)
    if missing or unexpected or bad:
        raise CLIPCheckpointError(f"CLIP checkpoint {path} is not a ViT-H/14 vision tower: missing {missing[:5]} "
                                  f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)}), "
                                  f"shape mismatches {bad[:5]}")
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, assign=True)
    return model.eval()
