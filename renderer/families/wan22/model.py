"""The Wan2.2 diffusion transformer (DiT), in plain PyTorch.

One class covers every Wan2.2 variant the renderer serves:
  * t2v-A14B experts  (in 16 -> out 16 channels, one timestep per sample),
  * i2v-A14B experts  (in 36 = 16 noise + 4 mask + 16 image-latent channels),
  * ti2v-5B           (in/out 48, one timestep per token: the conditioning frame's tokens get t = 0).

Module names match the official Wan-AI state-dict keys, so an official checkpoint loads without renaming;
renderer/families/wan22/keys.py maps the diffusers names onto these.

Precision follows the reference: the residual stream, the time embedding, the modulation and every norm are
computed in fp32; the projections, attention and FFN run in the parameter dtype (bf16 for real renders).

Speed: the memory-bound steps around the matmuls (q/k RMSNorm + RoPE, LayerNorm modulation, gated residual
adds) go through the dispatchers of kernels/fused.py (Triton on CUDA, the plain math here on the CPU); attention
defaults to the "auto" backend (the measured fastest kernel on a GPU, "sdpa" on the CPU); and on a CUDA device
the blocks are compiled with torch.compile at the first forward (`compile_mode`, kernels/compile.py).

Parallelism is not in here. The model declares where its tokens are split and gathered (SP_PLAN, like diffusers'
`_cp_plan`) and `renderer/parallel` applies it from outside: it puts a sequence-parallel attention into the
declared `attn_fn` slots and sets `WanDiT.token_split`, which splits the declared tensors after the embeddings
and gathers the declared outputs after the head.

Shapes: B batch, C channels, F/H/W latent frames/height/width, L = (F/pt)(H/ph)(W/pw) video tokens, Lc text
tokens (512), D model dim, Hn heads, Dh head dim (128 in the real models), E = 6 modulation chunks.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import autotune
from kernels.attention import AttentionFn, attention
from kernels.settings import KernelSettings
from kernels.compile import blocks_compiled, compile_blocks, compile_wanted
from kernels.fused import apply_rope, gated_residual, ln_modulate, rms_norm_rope  # noqa: F401 (apply_rope: API)
from renderer.families.spec import SequenceParallelPlan, TokenSplit, gather_stream, split_stream

log = logging.getLogger("wanrender.model")


@dataclass(frozen=True)
class DiTConfig:
    in_dim: int = 16
    out_dim: int = 16
    dim: int = 5120
    ffn_dim: int = 13824
    num_heads: int = 40
    num_layers: int = 40
    text_dim: int = 4096
    text_len: int = 512
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    cross_attn_norm: bool = True
    rope_theta: float = 10000.0
    # CLIP image features (Wan2.1 i2v, Animate): their width; the model then has `img_emb` and image k/v in every
    # cross-attention. None: text only (every Wan2.2 preset)
    image_dim: int | None = None

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"DiT dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"DiT head dim {self.head_dim} must be even and at least 6 for the 3D RoPE")
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DiTConfig":
        """From our preset dict, an official Wan-AI config.json or a diffusers transformer config.json."""
        if "num_attention_heads" in d:  # diffusers naming
            d = {
                "in_dim": d["in_channels"],
                "out_dim": d.get("out_channels") or d["in_channels"],
                "dim": d["num_attention_heads"] * d["attention_head_dim"],
                "num_heads": d["num_attention_heads"],
                "ffn_dim": d["ffn_dim"],
                "num_layers": d["num_layers"],
                "text_dim": d.get("text_dim", 4096),
                "freq_dim": d.get("freq_dim", 256),
                "patch_size": d.get("patch_size", (1, 2, 2)),
                "eps": d.get("eps", 1e-6),
                "cross_attn_norm": d.get("cross_attn_norm", True),
                "image_dim": d.get("image_dim"),
            }
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------------
# embeddings


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """cat[cos, sin] of t·10000^(-i/half), computed in float64 as the reference does. t: [N] -> [N, dim]."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)  # [half]
    angles = torch.outer(t.to(torch.float64), freqs)  # [N, half]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)  # [N, dim]


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Complex pairs of a head given to time, height and width: 22:21:21 for a 128-wide head."""
    pairs = head_dim // 2
    hw = head_dim // 6
    return pairs - 2 * hw, hw, hw


def rope_table(grid: tuple[int, int, int], head_dim: int, theta: float, device: torch.device):
    """cos and sin of the 3D rotary angles for an F×H×W token grid: two [L, Dh/2] fp32 tensors.

    Token order is frame-major, then row, then column (the order the patch embedding flattens to).
    """
    angles = []
    for axis, (n, pairs) in enumerate(zip(grid, rope_split(head_dim))):
        part_dim = 2 * pairs
        inv = 1.0 / theta ** (torch.arange(0, part_dim, 2, dtype=torch.float64, device=device) / part_dim)  # [pairs]
        a = torch.outer(torch.arange(n, dtype=torch.float64, device=device), inv)  # [n, pairs]
        shape = [1, 1, 1, pairs]
        shape[axis] = n
        angles.append(a.view(shape).expand(*grid, pairs))  # [F, H, W, pairs]
    ang = torch.cat(angles, dim=-1).reshape(-1, head_dim // 2)  # [L, Dh/2]
    return torch.cos(ang).float(), torch.sin(ang).float()


# ----------------------------------------------------------------------------------------------------------
# layers


class RMSNorm(nn.Module):
    """RMS norm over the full model dim (before the heads are split), normalised in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.fused = True  # KernelSettings.fused (WanDiT.use_kernels)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x: [B, L, D] -> [B, L, D]; with `rope` (cos/sin [L, Dh/2]) the heads are rotated in the same pass."""
        return rms_norm_rope(x, self.weight, self.eps, rope, fused=self.fused)


def layer_norm_fp32(x: torch.Tensor, eps: float, norm: nn.LayerNorm | None = None) -> torch.Tensor:
    """LayerNorm in fp32 (no affine unless `norm` carries one). x: [B, L, D] -> fp32 [B, L, D]."""
    if norm is None:
        return F.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    w = norm.weight.float() if norm.weight is not None else None
    b = norm.bias.float() if norm.bias is not None else None
    return F.layer_norm(x.float(), (x.shape[-1],), w, b, eps)


class _Projections(nn.Module):
    """q/k/v/o projections with q/k RMSNorm over the full dim: the parameters both attentions of a block have.

    image_kv: also k/v projections (and a k norm) for image-context tokens, as the official i2v cross-attention
    (`k_img`, `v_img`, `norm_k_img`): Animate's CLIP features attend beside the text."""

    def __init__(self, cfg: DiTConfig, image_kv: bool = False):
        super().__init__()
        d = cfg.dim
        self.num_heads = cfg.num_heads
        # KernelSettings.attention / allow_lossy (WanDiT.use_kernels)
        self.attn_backend, self.allow_lossy = "auto", False
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.norm_q = RMSNorm(d, cfg.eps)
        self.norm_k = RMSNorm(d, cfg.eps)
        if image_kv:
            self.k_img, self.v_img = nn.Linear(d, d), nn.Linear(d, d)
            self.norm_k_img = RMSNorm(d, cfg.eps)


class WanSelfAttention(_Projections):
    """RoPE on q and k (fused with their RMSNorm). `attn_fn` is the slot sequence parallelism fills (SP_PLAN);
    None: local attention with this pipeline's backend."""

    def __init__(self, cfg: DiTConfig):
        super().__init__(cfg)
        self.attn_fn: AttentionFn | None = None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        heads = (self.num_heads, -1)
        q = self.norm_q(self.q(x), rope).unflatten(-1, heads)  # [B, L, Hn, Dh], normalised and rotated
        k = self.norm_k(self.k(x), rope).unflatten(-1, heads)  # [B, L, Hn, Dh]
        v = self.v(x).unflatten(-1, heads)  # [B, L, Hn, Dh]
        if self.attn_fn is not None:
            out = self.attn_fn(q, k, v)  # [B, L, Hn, Dh]
        else:
            out = attention(q, k, v, self.attn_backend, self.allow_lossy)  # [B, L, Hn, Dh]
        return self.o(out.flatten(-2))  # [B, L, D]


class WanCrossAttention(_Projections):
    """Video tokens attend to the text tokens (and, with image k/v, separately to the image tokens; the two
    results are summed before `o`, as the official i2v cross-attention). Always local: every rank holds the whole
    context."""

    def __init__(self, cfg: DiTConfig):
        super().__init__(cfg, image_kv=cfg.image_dim is not None)

    def forward(self, x: torch.Tensor, context: torch.Tensor,
                image_context: torch.Tensor | None = None) -> torch.Tensor:
        heads = (self.num_heads, -1)
        q = self.norm_q(self.q(x)).unflatten(-1, heads)  # [B, L, Hn, Dh]
        k = self.norm_k(self.k(context)).unflatten(-1, heads)  # [B, Lc, Hn, Dh]
        v = self.v(context).unflatten(-1, heads)  # [B, Lc, Hn, Dh]
        out = attention(q, k, v, self.attn_backend, self.allow_lossy).flatten(-2)  # [B, L, D]
        if image_context is not None:
            if not hasattr(self, "k_img"):
                raise ValueError("image context given to a model without image k/v (its config has no image_dim)")
            k_img = self.norm_k_img(self.k_img(image_context)).unflatten(-1, heads)  # [B, Li, Hn, Dh]
            v_img = self.v_img(image_context).unflatten(-1, heads)  # [B, Li, Hn, Dh]
            out = out + attention(q, k_img, v_img, self.attn_backend, self.allow_lossy).flatten(-2)  # [B, L, D]
        return self.o(out)  # [B, L, D]


class WanBlock(nn.Module):
    """x += self_attn(mod(LN(x)))·gate; x += cross_attn(LN3(x), text); x += ffn(mod(LN(x)))·gate."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.eps = cfg.eps
        self.self_attn = WanSelfAttention(cfg)
        self.cross_attn = WanCrossAttention(cfg)
        # norm1/norm2 carry no parameters; norm3 (before cross-attention) is affine
        self.norm3 = nn.LayerNorm(cfg.dim, eps=cfg.eps) if cfg.cross_attn_norm else None
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, cfg.dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim**0.5)
        self.fused = True  # KernelSettings.fused (WanDiT.use_kernels)

    def forward(self, x: torch.Tensor, e0: torch.Tensor, context: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor], image_context: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, L, D] fp32 residual stream; e0: [B, 1|L, 6, D] fp32; context: [B, Lc, D];
        image_context: [B, Li, D] or None."""
        dt = self.ffn[0].weight.dtype
        mod = self.modulation.float()  # [1, 6, D]

        def chunk(i: int) -> torch.Tensor:
            # one modulation row at a time: with per-token timesteps (ti2v) e0 is [B, L, 6, D], and adding all six
            # at once would hold a second [B, L, 6, D] copy per block. Same fp32 sums as the reference.
            return mod[:, i] + e0[:, :, i]  # [B, 1|L, D]

        f = self.fused
        h = ln_modulate(x, chunk(0), chunk(1), self.eps, dt, f)  # LN(x)·(1 + scale1) + shift1: [B, L, D] in dt
        x = gated_residual(x, self.self_attn(h, rope), chunk(2), f)  # x + attn·gate1: [B, L, D] fp32
        h = layer_norm_fp32(x, self.eps, self.norm3) if self.norm3 is not None else x  # [B, L, D]
        x = gated_residual(x, self.cross_attn(h.to(dt), context, image_context), None, f)  # [B, L, D] fp32
        h = ln_modulate(x, chunk(3), chunk(4), self.eps, dt, f)  # [B, L, D] in dt
        return gated_residual(x, self.ffn(h), chunk(5), f)  # x + ffn·gate2: [B, L, D] fp32


class ImageEmbedding(nn.Module):
    """CLIP features -> model width, as the official MLPProj (LN, Linear, GELU, Linear, LN; keys img_emb.proj.N)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, in_dim), nn.GELU(),
                                  nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features: [B, Li, image_dim] -> [B, Li, D]."""
        return self.proj(features.to(self.proj[1].weight.dtype))  # [B, Li, D]


class WanHead(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.eps = cfg.eps
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x: [B, L, D] fp32; e: [B, 1|L, D] fp32 -> [B, L, pt·ph·pw·C_out]."""
        shift, scale = (self.modulation.float().unsqueeze(0) + e.unsqueeze(2)).unbind(2)  # 2 × [B, 1|L, D]
        h = layer_norm_fp32(x, self.eps) * (1 + scale) + shift  # [B, L, D]
        return self.head(h.to(self.head.weight.dtype))  # [B, L, P·C_out]


# ----------------------------------------------------------------------------------------------------------
# the model

# parameters kept in fp32 whatever the render dtype: small, and the reference computes them in fp32
FP32_PARAM_MARKERS = ("time_embedding", "time_projection", "modulation", "norm3")


def keeps_fp32(name: str) -> bool:
    return any(m in name for m in FP32_PARAM_MARKERS)


# Where sequence parallelism splits and gathers this model's tokens (applied by renderer/parallel/parallelize.py).
# Names are the tensors of WanDiT.forward's token stream; a split name whose tensor has one row instead of L
# (timesteps shared by every token) is left whole.
SP_PLAN = SequenceParallelPlan(
    split={"tokens": 1, "rope_cos": 0, "rope_sin": 0, "time": 1, "time_mod": 1},
    gather={"out": 1},
    attention=("blocks.*.self_attn",),
)


class WanDiT(nn.Module):
    sp_plan = SP_PLAN

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.num_layers))
        self.head = WanHead(cfg)
        if cfg.image_dim is not None:
            self.img_emb = ImageEmbedding(cfg.image_dim, d)
        self.token_split: TokenSplit | None = None
        self.kernels = KernelSettings()  # the pipeline's kernel choices (use_kernels)
        # in a render group: returns rank 0's value on every rank (set from outside by renderer/parallel), so
        # "auto" attention runs rank 0's choice everywhere
        self.kernel_agree: Callable[[str], str] | None = None
        self._agreed: set[tuple] = set()
        # "auto": compile the blocks at the first forward on a CUDA device; "on" / "off" force it (kernels/compile.py)
        self.compile_mode: str = "auto"
        self.compile_seconds: dict[str, float] = {}  # shape key -> first (compiling) call of a block, seconds
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- kernels --------------------------------------------------------------------------------------------
    def use_kernels(self, kernels: KernelSettings) -> "WanDiT":
        """Apply a pipeline's KernelSettings: attention backend (and whether "auto" may be lossy) in every
        attention, fused ops in every block and norm, the compile mode. Returns the model."""
        self.kernels = kernels
        self.compile_mode = kernels.compile
        for m in self.modules():
            if isinstance(m, _Projections):
                m.attn_backend, m.allow_lossy = kernels.attention, kernels.allow_lossy
            if isinstance(m, (WanBlock, RMSNorm)):
                m.fused = kernels.fused
        return self

    # -- precision ------------------------------------------------------------------------------------------
    def set_dtype(self, dtype: torch.dtype) -> "WanDiT":
        """Cast to the render dtype, keeping the fp32 parameters (time embedding, modulation, norm3) in fp32."""
        for name, p in self.named_parameters():
            p.data = p.data.to(torch.float32 if keeps_fp32(name) else dtype)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    # -- stages ---------------------------------------------------------------------------------------------
    def rope(self, grid: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables, computed once per token grid and device (every step of a shot reuses them)."""
        key = (grid, str(device))
        if key not in self._rope_cache:
            if len(self._rope_cache) > 8:
                self._rope_cache.clear()
            self._rope_cache[key] = rope_table(grid, self.cfg.head_dim, self.cfg.rope_theta, device)
        return self._rope_cache[key]

    def embed_time(self, t: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """t: [B] or [B, L] -> e [B, 1|L, D] and e0 [B, 1|L, 6, D], fp32.

        Per-token timesteps that are all equal collapse to one row per sample: the A14B experts always get
        one timestep, and keeping [B, L, 6, D] for 75,600 tokens would cost 9 GB for nothing.
        """
        if t.ndim == 2:
            if t.shape[1] != num_tokens:
                raise ValueError(f"per-token timesteps have {t.shape[1]} entries for {num_tokens} video tokens")
            if bool((t == t[:, :1]).all()):
                t = t[:, 0]
        rows = t.reshape(t.shape[0], -1)  # [B, 1|L]
        w = self.time_embedding[0].weight
        sin = sinusoidal_embedding(rows.flatten(), self.cfg.freq_dim).to(w.dtype)  # [B·(1|L), freq]
        e = self.time_embedding(sin).float()  # [B·(1|L), D]
        e0 = self.time_projection(e.to(self.time_projection[1].weight.dtype)).float()  # [B·(1|L), 6D]
        e = e.unflatten(0, rows.shape)  # [B, 1|L, D]
        e0 = e0.unflatten(0, rows.shape).unflatten(-1, (6, -1))  # [B, 1|L, 6, D]
        return e, e0

    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        """context: [B, Lc ≤ text_len, text_dim], zero rows after each prompt -> [B, text_len, D]."""
        if context.shape[1] > self.cfg.text_len:
            raise ValueError(f"text context has {context.shape[1]} tokens, the model takes at most {self.cfg.text_len}")
        pad = self.cfg.text_len - context.shape[1]
        context = F.pad(context, (0, 0, 0, pad))  # [B, text_len, text_dim]
        return self.text_embedding(context.to(self.dtype))  # [B, text_len, D]

    def patchify(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """x: [B, C_in, F, H, W] -> tokens [B, L, D] fp32 and the token grid (F/pt, H/ph, W/pw)."""
        pt, ph, pw = self.cfg.patch_size
        _, _, f, h, w = x.shape
        if f % pt or h % ph or w % pw:
            raise ValueError(f"latent {f}×{h}×{w} is not a multiple of the patch size {self.cfg.patch_size}")
        if x.shape[1] != self.cfg.in_dim:
            raise ValueError(f"latent has {x.shape[1]} channels, the model takes {self.cfg.in_dim}")
        tokens = self.patch_embedding(x.to(self.dtype))  # [B, D, F', H', W']
        grid = tuple(tokens.shape[2:])
        return tokens.flatten(2).transpose(1, 2).float(), grid  # [B, L, D]

    def unpatchify(self, out: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """out: [B, L, pt·ph·pw·C] -> [B, C, F'·pt, H'·ph, W'·pw]."""
        pt, ph, pw = self.cfg.patch_size
        f, h, w = grid
        u = out.unflatten(1, (f, h, w)).unflatten(-1, (pt, ph, pw, -1))  # [B, F', H', W', pt, ph, pw, C]
        u = u.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, F', pt, H', ph, W', pw]
        return u.reshape(u.shape[0], u.shape[1], f * pt, h * ph, w * pw)

    # -- forward ------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the flow velocity. Called with the keyword inputs a conditioner built (renderer/denoise.py);
        a family that conditions on more (Animate: pose, face) subclasses and adds keywords.

        x: [B, C_in, F, H, W] latent (i2v: noise, mask and image latent concatenated on C);
        t: [B] timesteps in [0, 1000], or [B, L] per token (ti2v); context: [B, Lc ≤ text_len, text_dim];
        image_features: [B, Li, image_dim] CLIP features (models with image k/v only).
        Returns [B, C_out, F, H, W] fp32.
        """
        tokens, grid = self.patchify(x)  # [B, L, D], (F', H', W')
        num_tokens = tokens.shape[1]
        e, e0 = self.embed_time(t, num_tokens)  # [B, 1|L, D], [B, 1|L, 6, D]
        ctx = self.embed_text(context)  # [B, text_len, D]
        image_ctx = self.embed_image(image_features)  # [B, Li, D] or None
        cos, sin = self.rope(grid, tokens.device)  # 2 × [L, Dh/2]

        stream = {"tokens": tokens, "rope_cos": cos, "rope_sin": sin, "time": e, "time_mod": e0}
        if self.token_split is not None:  # sequence parallel: each rank keeps its slice of the tokens (SP_PLAN)
            stream = split_stream(self.token_split, stream, self.sp_plan.split, num_tokens)
        tokens = self.run_blocks(stream["tokens"], stream["time_mod"], ctx, (stream["rope_cos"], stream["rope_sin"]),
                                 image_ctx)  # [B, L_local, D]
        out = {"out": self.head(tokens, stream["time"])}  # [B, L_local, P·C_out]
        if self.token_split is not None:
            out = gather_stream(self.token_split, out, self.sp_plan.gather)  # [B, L, P·C_out]
        return self.unpatchify(out["out"].float(), grid)  # [B, C_out, F, H, W]

    def embed_image(self, features: torch.Tensor | None) -> torch.Tensor | None:
        """features: [B, Li, image_dim] -> [B, Li, D]; None stays None."""
        if features is None:
            return None
        if not hasattr(self, "img_emb"):
            raise ValueError("image features given to a model without image k/v: set image_dim in its dit config")
        return self.img_emb(features)  # [B, Li, D]

    def run_blocks(self, tokens: torch.Tensor, e0: torch.Tensor, ctx: torch.Tensor,
                   rope: tuple[torch.Tensor, torch.Tensor], image_ctx: torch.Tensor | None) -> torch.Tensor:
        """The transformer blocks over this rank's tokens [B, L_local, D] (a family that injects between blocks,
        such as Animate's face adapter, overrides this)."""
        self._prepare_fast_path(tokens, e0, ctx)
        for i, block in enumerate(self.blocks):
            if i == 0 and blocks_compiled(self):
                tokens = self._first_block_timed(block, tokens, e0, ctx, rope, image_ctx)  # [B, L_local, D]
                continue
            tokens = block(tokens, e0, ctx, rope, image_ctx)  # [B, L_local, D]
        return tokens

    def _prepare_fast_path(self, tokens: torch.Tensor, e0: torch.Tensor, ctx: torch.Tensor) -> None:
        """Outside the compiled blocks: compile them if wanted, and let "auto" attention measure its choices
        eagerly here rather than while dynamo traces."""
        if not self.blocks:
            return
        if not blocks_compiled(self) and compile_wanted(self.compile_mode, tokens.device, _fsdp_sharded(self)):
            compile_blocks(self)
        if self.kernels.attention == "auto" and tokens.is_cuda:
            b, n = tokens.shape[:2]
            hn, dh, dt = self.cfg.num_heads, self.cfg.head_dim, self.dtype
            shapes = [(b, n, ctx.shape[1])]  # cross-attention: text keys
            if self.blocks[0].self_attn.attn_fn is None:  # sequence parallel attention agrees on its own shapes
                shapes.append((b, n, n))
            for shape in shapes:
                # every rank of a group runs the same forwards, so the first sight of a shape is the same call on
                # every rank: the one place where they can agree on rank 0's choice
                agree = self.kernel_agree if (dt, *shape) not in self._agreed else None
                autotune.prepare(tokens.device, dt, shape[0], shape[1], shape[2], hn, dh,
                                 self.kernels.allow_lossy, agree)
                self._agreed.add((dt, *shape))

    def _first_block_timed(self, block: nn.Module, tokens: torch.Tensor, *args) -> torch.Tensor:
        """Block 0 of a compiled model; the first call per shape compiles (the other blocks reuse its graph), so
        time it: that is the compile time the run log reports."""
        key = f"{tuple(tokens.shape)}|{args[0].shape[1]}|{tokens.device}|{self.dtype}"
        if key in self.compile_seconds:
            return block(tokens, *args)
        sync = torch.cuda.synchronize if tokens.is_cuda else (lambda: None)
        sync()
        t0 = time.perf_counter()
        out = block(tokens, *args)
        sync()
        self.compile_seconds[key] = time.perf_counter() - t0
        log.info("compiled the DiT blocks for %s in %.1f s", key, self.compile_seconds[key])
        return out


def _fsdp_sharded(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return False
    return isinstance(model, FSDPModule) or any(isinstance(b, FSDPModule) for b in model.blocks)


def build_dit(cfg: DiTConfig, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
              seed: int | None = None) -> WanDiT:
    """A DiT with random weights (benchmarks and tiny test models). `seed` makes the weights reproducible."""
    return build_random(WanDiT, cfg, dtype, device, seed)


def build_random(model_cls, cfg, dtype: torch.dtype, device: str | torch.device, seed: int | None):
    """`model_cls(cfg)` with random weights, created directly in `dtype` on `device` (a 14B model never passes
    through 56 GB of fp32); linears xavier-initialised as the reference's init_weights, so random-weight activations
    stay in range. `seed` makes the weights reproducible and leaves the global generator as it was."""
    gen_state = torch.random.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)
    prev_dtype = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype if dtype.is_floating_point else torch.float32)
        with torch.device(device):
            model = model_cls(cfg)
        for m in model.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
    finally:
        torch.set_default_dtype(prev_dtype)
        if seed is not None:
            torch.random.set_rng_state(gen_state)
    return model.set_dtype(dtype).eval()
