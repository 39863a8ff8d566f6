"""The Wan2.2-Animate-14B DiT: the Wan2.2 DiT backbone plus pose, image and face conditioning, in plain PyTorch.

What Animate adds to the backbone (renderer/families/wan22/model.py, whose blocks, embeddings and head are reused as they are):
  * pose_patch_embedding: a Conv3d patch embedding of the pose video's VAE latents, added to latent frames 1..T
    (frame 0 is the reference image and gets no pose);
  * img_emb: the CLIP projection MLP (LN, Linear, GELU, Linear, LN) of the 257 CLIP tokens, placed before the text
    tokens; every block's cross-attention gives them their own k/v (k_img, v_img, + RMSNorm on k) and sums the
    image and text attention outputs before the output projection;
  * the face path (face.py): motion encoder -> face encoder -> a face-adapter block after DiT blocks
    0, e, 2e, … (e = face_every = 5 in the real model: 40 blocks, 8 face blocks).
    Generalised "every 5 blocks" rule: ceil(num_layers / face_every) face blocks, block j after DiT block j·e. For a
    multiple of e this is the official count; for any other layer count (tiny test models) it is defined instead of
    indexing past the list (the official code and diffusers fail there).

Per-frame face attention under sequence parallelism: a face block lets each latent frame's tokens attend only to
that frame's N+1 motion tokens, so a rank needs nothing but its own tokens' frame numbers — global token g is in
frame g // (H'·W'), and the rank's slice starts at sp_rank·n. The official code all-gathers q over the whole
sequence instead and needs the padded token count to be a multiple of the frame count (Wan2.2 #178 crashes
otherwise); here padding tokens simply belong to no frame and get a zero residual.

Module names are the official state-dict keys. Shapes: as renderer/families/wan22/model.py, plus Li image tokens (257),
Tf face frames, T latent frames incl. the reference (T = 1 + (Tf − 1)/4), N+1 motion tokens per frame.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn as nn

from renderer.families.animate.face import MOTION_CHANNELS, FaceAdapter, FaceEncoder, MotionEncoder, frame_spans
from renderer.families.spec import gather_stream, split_stream
from renderer.families.wan22.model import SP_PLAN, DiTConfig, WanDiT  # noqa: F401 (SP_PLAN: the same plan)
from renderer.families.wan22.model import build_random
from renderer.families.wan22.model import keeps_fp32 as wan_keeps_fp32

# the motion encoder's frames go through it in batches of this many (the official batch; bounds its memory)
MOTION_BATCH = 8


@dataclass(frozen=True)
class AnimateConfig(DiTConfig):
    in_dim: int = 36  # 16 noise + 4 mask + 16 condition latent
    image_dim: int | None = 1280  # CLIP ViT-H/14 width: the backbone then has img_emb and image k/v
    latent_channels: int = 16  # pose latents (Wan2.1 VAE z)
    motion_size: int = 512  # face crop side
    motion_style_dim: int = 512
    motion_dim: int = 20
    motion_out_dim: int = 512
    # LIA channel width per resolution, as sorted (resolution, channels) pairs: the config stays hashable
    motion_channels: tuple = tuple(sorted(MOTION_CHANNELS.items()))
    face_hidden: int = 1024
    face_heads: int = 4
    face_every: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        pairs = self.motion_channels.items() if isinstance(self.motion_channels, dict) else self.motion_channels
        object.__setattr__(self, "motion_channels", tuple(sorted((int(k), int(v)) for k, v in pairs)))
        if self.face_every < 1:
            raise ValueError(f"face_every must be ≥ 1, got {self.face_every}")

    @property
    def num_face_blocks(self) -> int:
        return math.ceil(self.num_layers / self.face_every)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AnimateConfig":
        """From our preset dict, the official config.json or diffusers' WanAnimateTransformer3DModel config."""
        if "num_attention_heads" in d:
            base = DiTConfig.from_dict(d).to_dict()
            base["image_dim"] = d.get("image_dim") or 1280
            extra = {
                "latent_channels": d.get("latent_channels") or (d["in_channels"] - 4) // 2,
                "motion_size": d.get("motion_encoder_size", 512),
                "motion_style_dim": d.get("motion_style_dim", 512),
                "motion_dim": d.get("motion_dim", 20),
                "motion_out_dim": d.get("motion_encoder_dim", 512),
                "motion_channels": d.get("motion_encoder_channel_sizes") or MOTION_CHANNELS,
                "face_hidden": d.get("face_encoder_hidden_dim", 1024),
                "face_heads": d.get("face_encoder_num_heads", 4),
                "face_every": d.get("inject_face_latents_blocks", 5),
            }
            return cls(**base, **extra)
        d = dict(d)
        if "motion_encoder_dim" in d:  # the official config.json's name
            d.setdefault("motion_out_dim", d["motion_encoder_dim"])
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def keeps_fp32(name: str) -> bool:
    """Backbone rule plus the motion basis (orthonormalised by a QR in fp32)."""
    return wan_keeps_fp32(name) or name == "motion_encoder.dec.direction.weight"


class AnimateDiT(WanDiT):
    def __init__(self, cfg: AnimateConfig):
        super().__init__(cfg)  # backbone: embeddings, blocks with image k/v, img_emb (CLIP MLP), head
        d, p = cfg.dim, cfg.patch_size
        self.pose_patch_embedding = nn.Conv3d(cfg.latent_channels, d, kernel_size=p, stride=p)
        self.motion_encoder = MotionEncoder(cfg.motion_size, cfg.motion_style_dim, cfg.motion_dim,
                                            cfg.motion_out_dim, dict(cfg.motion_channels))
        self.face_encoder = FaceEncoder(cfg.motion_out_dim, d, cfg.face_hidden, cfg.face_heads, cfg.eps)
        self.face_adapter = FaceAdapter(d, cfg.num_heads, cfg.num_face_blocks, cfg.eps)

    def use_kernels(self, kernels) -> "AnimateDiT":
        """The backbone's kernel settings, and the same attention backend in the face blocks."""
        super().use_kernels(kernels)
        for block in self.face_adapter.fuser_blocks:
            block.attn_backend, block.allow_lossy = kernels.attention, kernels.allow_lossy
        return self

    def set_dtype(self, dtype: torch.dtype) -> "AnimateDiT":
        for name, p in self.named_parameters():
            p.data = p.data.to(torch.float32 if keeps_fp32(name) else dtype)
        return self

    # -- conditioning computed once per clip (the official code recomputes it every forward) --------------------
    @torch.no_grad()
    def encode_face(self, faces: torch.Tensor) -> torch.Tensor:
        """faces: [B, 3, Tf, S, S] in [-1, 1] -> motion tokens [B, 1 + T', N+1, D] (a zero frame for the reference)."""
        b, _, tf = faces.shape[:3]
        frames = faces.transpose(1, 2).flatten(0, 1)  # [B·Tf, 3, S, S]
        motion = torch.cat([self.motion_encoder(chunk) for chunk in frames.split(MOTION_BATCH)])  # [B·Tf, 512]
        tokens = self.face_encoder(motion.unflatten(0, (b, tf)))  # [B, T', N+1, D]
        return torch.cat([torch.zeros_like(tokens[:, :1]), tokens], dim=1)  # [B, 1 + T', N+1, D]

    @torch.no_grad()
    def encode_image(self, clip_tokens: torch.Tensor) -> torch.Tensor:
        """CLIP features [B, Li, image_dim] -> image context [B, Li, D] fp32."""
        return self.embed_image(clip_tokens)

    # -- forward ----------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                image_features: torch.Tensor | None = None, pose: torch.Tensor | None = None,
                face: torch.Tensor | None = None, motion: torch.Tensor | None = None,
                image_context: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the flow velocity (keyword inputs from the Animate conditioner).

        x: [B, 36, T, H, W] (noise, 4 mask channels, condition latent); t: [B]; context: [B, Lc, text_dim];
        image_features: [B, Li, image_dim] CLIP features (or image_context = encode_image(...), cached per shot);
        pose: [B, 16, T−1, H, W] pose latents; face: [B, 3, Tf, S, S] face crops in [-1, 1] (or motion =
        encode_face(face), cached per clip). Returns [B, 16, T, H, W] fp32.
        """
        if pose is None or (face is None and motion is None) or (image_features is None and image_context is None):
            raise ValueError("the Animate DiT needs pose latents, face crops (or motion tokens) and CLIP features")
        if x.shape[1] != self.cfg.in_dim:
            raise ValueError(f"latent has {x.shape[1]} channels, the model takes {self.cfg.in_dim}")
        if pose.shape[2] + 1 != x.shape[2] or pose.shape[3:] != x.shape[3:]:
            raise ValueError(f"pose latents {tuple(pose.shape[2:])} must cover latent frames 1..{x.shape[2] - 1} "
                             f"of the {tuple(x.shape[2:])} latent")
        pt, ph, pw = self.cfg.patch_size
        if x.shape[2] % pt or x.shape[3] % ph or x.shape[4] % pw:
            raise ValueError(f"latent {tuple(x.shape[2:])} is not a multiple of the patch size {self.cfg.patch_size}")
        if motion is None:
            motion = self.encode_face(face)  # [B, T, N+1, D]
        if motion.shape[1] != x.shape[2]:
            raise ValueError(f"{motion.shape[1] - 1} face steps for {x.shape[2] - 1} latent frames after the "
                             f"reference: the face video needs 4·{x.shape[2] - 2}+1 = {4 * x.shape[2] - 7} frames")
        if image_context is None:
            image_context = self.embed_image(image_features)  # [B, Li, D]

        dt = self.dtype
        grid_tokens = self.patch_embedding(x.to(dt))  # [B, D, T, H', W']
        grid_tokens[:, :, 1:] += self.pose_patch_embedding(pose.to(dt))  # pose on frames 1..T−1
        grid = tuple(grid_tokens.shape[2:])
        tokens = grid_tokens.flatten(2).transpose(1, 2).float()  # [B, L, D]
        num_tokens = tokens.shape[1]
        e, e0 = self.embed_time(t, num_tokens)  # [B, 1, D], [B, 1, 6, D]
        ctx = self.embed_text(context)  # [B, text_len, D]
        cos, sin = self.rope(grid, tokens.device)  # 2 × [L, Dh/2]

        stream = {"tokens": tokens, "rope_cos": cos, "rope_sin": sin, "time": e, "time_mod": e0}
        offset = 0
        if self.token_split is not None:  # sequence parallel: this rank keeps tokens [offset, offset + n)
            stream = split_stream(self.token_split, stream, self.sp_plan.split, num_tokens)
            offset = self.token_split.sp_rank * self.token_split.local_len(num_tokens)
        spans = frame_spans(grid[1] * grid[2], grid[0], offset, stream["tokens"].shape[1])
        tokens = self.run_blocks(stream["tokens"], stream["time_mod"], ctx, (stream["rope_cos"], stream["rope_sin"]),
                                 image_context.to(dt), face=(motion.to(dt), spans))  # [B, L_local, D]
        out = {"out": self.head(tokens, stream["time"])}  # [B, L_local, P·C_out]
        if self.token_split is not None:
            out = gather_stream(self.token_split, out, self.sp_plan.gather)  # [B, L, P·C_out]
        return self.unpatchify(out["out"].float(), grid)  # [B, C_out, T, H, W]

    def run_blocks(self, tokens: torch.Tensor, e0: torch.Tensor, ctx: torch.Tensor,
                   rope: tuple[torch.Tensor, torch.Tensor], image_ctx: torch.Tensor | None,
                   face: tuple[torch.Tensor, list] | None = None) -> torch.Tensor:
        """The backbone blocks, and after block j·face_every the face block j's residual (see the module doc).
        face: (motion tokens [B, T, N+1, D], this rank's frame spans)."""
        if face is None:
            raise ValueError("the Animate blocks need motion tokens")
        motion, spans = face
        self._prepare_fast_path(tokens, e0, ctx)
        every = self.cfg.face_every
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, e0, ctx, rope, image_ctx)  # [B, L_local, D]
            if i % every == 0:
                tokens = tokens + self.face_adapter.fuser_blocks[i // every](tokens, motion, spans)  # [B, L_local, D]
        return tokens


def build_animate(cfg: AnimateConfig, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                  seed: int | None = None) -> AnimateDiT:
    """An Animate DiT with random weights (benchmarks, tiny test models), created directly in `dtype`."""
    return build_random(AnimateDiT, cfg, dtype, device, seed)
