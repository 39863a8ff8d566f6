"""Building blocks shared by the Wan2.1 and Wan2.2 video VAEs.

Every layer that mixes information across time is *causal*: output frame t only
sees input frames <= t.  That lets us run the networks as a stream, a few frames
at a time, with a small explicit memory (`StreamState`) carried from one chunk to
the next instead of holding the whole video in activation memory.

Layout of every activation tensor: [B, C, T, H, W].

Module and parameter names (`residual.2`, `resample.1`, `time_conv`, `gamma`, ...)
follow the official Wan checkpoints so that their state dicts load unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "SpatialSplit",
    "StreamState",
    "CausalConv3d",
    "RMSNorm",
    "Resample",
    "ResidualBlock",
    "AttentionBlock",
    "AvgDown3d",
    "DupUp3d",
    "patchify",
    "unpatchify",
    "assign_cache_keys",
]


class SpatialSplit(Protocol):
    """This process's share of every frame when a decode is split across processes along one spatial axis.

    The layers stay plain PyTorch: they only ask the split (implemented with
    torch.distributed in renderer/vae/parallel_decode.py) for the neighbours'
    border pixels and, for the frame-wide attention, for the whole frame.
    """

    axis: int  # the split axis of a [B, C, T, H, W] activation: 3 (rows) or 4 (columns)

    def halo(self, x: Tensor, width: int) -> Tensor:
        """x with `width` neighbouring rows/columns added on each side of the split axis (zeros at frame edges)."""
        ...

    def gather(self, x: Tensor) -> Tensor:
        """The whole frame: every process's share of x concatenated along the split axis."""
        ...


@dataclass
class StreamState:
    """What the causal layers of one encoder/decoder remember between chunks.

    `frames` maps a layer's `cache_key` (its dotted module path) to the last few
    frames of that layer's input stream; `chunks_done` counts the chunks already
    processed (the very first chunk is special-cased by the resampling layers).
    A fresh `StreamState()` starts a new video.  `split` is set when this
    process decodes only a spatial share of each frame (decode only); the
    cached frames are then that share with its halo.
    """

    frames: dict[str, Tensor] = field(default_factory=dict)
    chunks_done: int = 0
    split: SpatialSplit | None = None

    @property
    def first_chunk(self) -> bool:
        return self.chunks_done == 0

    def to(self, device: torch.device | str) -> "StreamState":
        return StreamState({k: v.to(device) for k, v in self.frames.items()}, self.chunks_done, self.split)


def _triple(v: int | tuple[int, ...]) -> tuple[int, int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v, v)  # type: ignore[return-value]


class CausalConv3d(nn.Conv3d):
    """3D convolution, zero-padded symmetrically in space and only *before* in time.

    With temporal padding p the official layer pads 2p frames in front and none
    behind.  When streaming, those 2p "front" frames are the tail of the previous
    chunk (zeros before the first chunk), which we keep in the `StreamState`.
    Keeping exactly the last 2p frames of (history + chunk) reproduces the
    reference cache rules for any chunk length, including 1-frame chunks.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int | tuple, stride: int | tuple = 1,
                 padding: int | tuple = 0) -> None:
        pad_t, pad_h, pad_w = _triple(padding)
        # Spatial zero padding is left to the conv itself (no padded copy of x).
        super().__init__(in_ch, out_ch, kernel, stride=stride, padding=(0, pad_h, pad_w))
        self.history = 2 * pad_t  # past frames this conv needs in front of each chunk
        self.cache_key = ""  # set by assign_cache_keys()

    def forward(self, x: Tensor, state: StreamState | None = None) -> Tensor:
        split = state.split if state is not None else None
        padding = self.padding
        if split is not None and self.padding[split.axis - 2]:
            # the neighbours' border pixels replace the zero padding along the split axis; the
            # cache below then keeps the haloed frames, so later chunks need no second exchange
            width = self.padding[split.axis - 2]
            x = split.halo(x, width)  # [B,C,T,H(+2p),W(+2p)]
            padding = tuple(0 if d == split.axis - 2 else p for d, p in enumerate(self.padding))
        if self.history:
            past = state.frames.get(self.cache_key) if state is not None else None
            if past is None:  # start of the stream: the reference pads zeros
                b, c, _, h, w = x.shape
                past = x.new_zeros(b, c, self.history, h, w)  # [B,C,2p,H,W]
            x = torch.cat([past, x], dim=2)  # [B,C,2p+T,H,W]
            if state is not None:
                # clone so the cache does not pin the whole concatenated buffer
                state.frames[self.cache_key] = x[:, :, -self.history:].clone()  # [B,C,2p,H,W]
        if padding is not self.padding:  # split: no zero padding along the split axis, the halo is there
            return F.conv3d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)  # [B,O,T,h,w]
        return super().forward(x)  # [B,Cout,T',H',W']


def assign_cache_keys(root: nn.Module) -> None:
    """Give every CausalConv3d under `root` a unique key into a StreamState."""
    for name, module in root.named_modules():
        if isinstance(module, CausalConv3d):
            module.cache_key = name


class RMSNorm(nn.Module):
    """Scale every pixel's channel vector to length sqrt(C), then multiply by gamma.

    `video=True` gives gamma the shape [C,1,1,1] of the official checkpoints'
    3D norms, `video=False` the [C,1,1] of the attention block's 2D norm.  The
    norm itself is computed in fp32 (a [B,1,T,H,W] tensor, cheap) so bf16 inputs
    do not lose precision, without making an fp32 copy of x.
    """

    def __init__(self, dim: int, video: bool = True) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1, 1) if video else torch.ones(dim, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=torch.float32)  # [B,1,T,H,W]
        inv = (self.scale / norm.clamp_min(1e-12)).to(x.dtype)  # same eps as F.normalize
        gamma = self.gamma.reshape(-1, *([1] * (x.dim() - 2)))  # [C,1,1,1] whatever x's rank
        return x * inv * gamma  # [B,C,T,H,W]


def _conv2d_per_frame(x: Tensor, conv: nn.Conv2d, split: SpatialSplit | None = None) -> Tensor:
    """Apply a 2D conv to every frame of [B,C,T,H,W] without reshaping to [B*T,...].

    A (1,kh,kw) 3D kernel is the same computation and saves two permute copies.
    With a split, the neighbours' border pixels replace the zero padding along its axis.
    """
    w = conv.weight.unsqueeze(2)  # [O,I,1,kh,kw]
    s, p = conv.stride, conv.padding
    if split is not None and p[split.axis - 3]:
        x = split.halo(x, p[split.axis - 3])  # [B,C,T,H(+2p),W(+2p)]
        p = tuple(0 if d == split.axis - 3 else v for d, v in enumerate(p))
    return F.conv3d(x, w, conv.bias, stride=(1, *s), padding=(0, *p))  # [B,O,T,H',W']


class Resample(nn.Module):
    """Spatial 2x up/down-sampling, optionally with 2x temporal up/down-sampling.

    modes: upsample2d | upsample3d | downsample2d | downsample3d.
    `resample` is a 2-slot Sequential only so that the conv is named
    `resample.1` as in the checkpoints; slot 0 (the parameter-free resize/pad) is
    done inline in forward() on the 5D tensor.
    """

    def __init__(self, dim: int, mode: str, out_dim: int | None = None) -> None:
        super().__init__()
        if mode not in ("upsample2d", "upsample3d", "downsample2d", "downsample3d"):
            raise ValueError(f"unknown resample mode {mode!r}")
        self.mode = mode
        if mode.startswith("up"):
            out_dim = dim if out_dim is None else out_dim
            self.resample = nn.Sequential(nn.Identity(), nn.Conv2d(dim, out_dim, 3, padding=1))
            if mode == "upsample3d":
                # predicts two output frames per input frame, stacked on channels
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        else:
            self.resample = nn.Sequential(nn.Identity(), nn.Conv2d(dim, dim, 3, stride=2))
            if mode == "downsample3d":
                # stride-2 temporal conv; its one frame of history is handled here
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: Tensor, state: StreamState) -> Tensor:
        conv = self.resample[1]
        if self.mode == "upsample3d" and not state.first_chunk:
            # The first chunk's single frame stays single (the video's first frame
            # is encoded alone); every later frame becomes two.  Because the time
            # conv is skipped on chunk 0, its history starts as zeros at chunk 1.
            b, c, t, h, w = x.shape
            y = self.time_conv(x, state)  # [B,2C,T,H,W]
            y = y.view(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5)  # [B,C,T,2,H,W]
            x = y.reshape(b, c, 2 * t, h, w)  # [B,C,2T,H,W], frame 2t+k = half k of t
        if self.mode.startswith("up"):
            x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")  # [B,C,T,2H,2W]
            return _conv2d_per_frame(x, conv, state.split)  # [B,C',T,2H,2W]
        if state.split is not None:
            raise NotImplementedError("a spatially split stream can only decode; encode the whole frame")

        # Downsampling pads one row/column at the bottom/right only (as trained).
        x = _conv2d_per_frame(F.pad(x, (0, 1, 0, 1)), conv)  # [B,C,T,H/2,W/2]
        if self.mode == "downsample3d":
            key = self.time_conv.cache_key
            if state.first_chunk:
                # first frame passes through; remember it as context for chunk 1
                state.frames[key] = x[:, :, -1:].clone()  # [B,C,1,h,w]
            else:
                prev = state.frames[key]  # [B,C,1,h,w]
                state.frames[key] = x[:, :, -1:].clone()
                x = self.time_conv(torch.cat([prev, x], dim=2))  # [B,C,T/2,h,w]
        return x


class ResidualBlock(nn.Module):
    """norm -> SiLU -> conv3 -> norm -> SiLU -> (dropout) -> conv3, plus a shortcut.

    Built as a Sequential so parameters are named residual.{0,2,3,6}; the SiLU
    and dropout slots carry no weights (dropout is 0 at inference).
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim), nn.SiLU(), nn.Dropout(0.0), CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        # 1x1x1 projection when the width changes; needs no temporal history
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor, state: StreamState) -> Tensor:
        norm1, _, conv1, norm2, _, _, conv2 = self.residual
        h = conv1(F.silu(norm1(x), inplace=True), state)  # [B,Cout,T,H,W]
        h = conv2(F.silu(norm2(h), inplace=True), state)  # [B,Cout,T,H,W]
        return h + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (no time mixing)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, video=False)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor, state: StreamState | None = None) -> Tensor:
        if state is not None and state.split is not None:
            return self._forward_split(x, state.split)
        b, c, t, h, w = x.shape
        qkv = _conv2d_per_frame(self.norm(x), self.to_qkv)  # [B,3C,T,H,W]
        qkv = qkv.permute(0, 2, 3, 4, 1).reshape(b * t, 1, h * w, 3 * c)  # [BT,1,HW,3C]
        q, k, v = qkv.chunk(3, dim=-1)  # each [BT,1,HW,C]; channel order q|k|v
        y = F.scaled_dot_product_attention(q, k, v)  # [BT,1,HW,C]
        y = y.view(b, t, h, w, c).permute(0, 4, 1, 2, 3)  # [B,C,T,H,W]
        return x + _conv2d_per_frame(y, self.proj)

    def _forward_split(self, x: Tensor, split: SpatialSplit) -> Tensor:
        """The same attention for this process's share of the pixels: its queries against the whole frame's keys.

        Keys and values come from the gathered (normalised) frame in global pixel
        order, so every query sees exactly the keys of the unsplit layer.
        """
        b, c, t, h, w = x.shape
        xn = self.norm(x)  # [B,C,T,h,w] this share
        weight, bias = self.to_qkv.weight.unsqueeze(2), self.to_qkv.bias  # [3C,C,1,1,1], [3C]
        q = F.conv3d(xn, weight[:c], bias[:c])  # [B,C,T,h,w]
        kv = F.conv3d(split.gather(xn), weight[c:], bias[c:])  # [B,2C,T,H,W] whole frame
        q = q.permute(0, 2, 3, 4, 1).reshape(b * t, 1, h * w, c)  # [BT,1,hw,C]
        kv = kv.permute(0, 2, 3, 4, 1).reshape(b * t, 1, -1, 2 * c)  # [BT,1,HW,2C]
        k, v = kv.chunk(2, dim=-1)  # each [BT,1,HW,C]
        y = F.scaled_dot_product_attention(q, k, v)  # [BT,1,hw,C]
        y = y.view(b, t, h, w, c).permute(0, 4, 1, 2, 3)  # [B,C,T,h,w]
        return x + _conv2d_per_frame(y, self.proj)


class AvgDown3d(nn.Module):
    """Parameter-free shortcut of the Wan2.2 down blocks.

    Folds each (ft x fs x fs) neighbourhood into channels (space-to-depth), then
    averages groups of consecutive channels down to `out_ch`.  An odd number of
    frames is padded with zero frames at the *front* (the lone first frame).
    """

    def __init__(self, in_ch: int, out_ch: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        self.out_ch, self.ft, self.fs = out_ch, factor_t, factor_s
        folded = in_ch * factor_t * factor_s * factor_s
        if folded % out_ch:
            raise ValueError(f"AvgDown3d: {folded} folded channels not divisible by {out_ch}")
        self.group = folded // out_ch

    def forward(self, x: Tensor) -> Tensor:
        ft, fs = self.ft, self.fs
        x = F.pad(x, (0, 0, 0, 0, (-x.shape[2]) % ft, 0))  # [B,C,T',H,W], T' multiple of ft
        b, c, t, h, w = x.shape
        x = x.view(b, c, t // ft, ft, h // fs, fs, w // fs, fs)
        x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)  # [B,C,ft,fs,fs,t,h,w]: channel order c,dt,dy,dx
        x = x.reshape(b, self.out_ch, self.group, t // ft, h // fs, w // fs)
        return x.mean(dim=2)  # [B,out,T'/ft,H/fs,W/fs]


class DupUp3d(nn.Module):
    """Parameter-free shortcut of the Wan2.2 up blocks (inverse of AvgDown3d).

    Repeats each channel, then unfolds channels into (ft x fs x fs) neighbours
    (depth-to-space).  On the first chunk the ft-1 leading frames are dropped so
    the single first frame stays single, like the main path.
    """

    def __init__(self, in_ch: int, out_ch: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        self.out_ch, self.ft, self.fs = out_ch, factor_t, factor_s
        folded = out_ch * factor_t * factor_s * factor_s
        if folded % in_ch:
            raise ValueError(f"DupUp3d: {folded} unfolded channels not divisible by {in_ch}")
        self.repeats = folded // in_ch

    def forward(self, x: Tensor, first_chunk: bool = False) -> Tensor:
        ft, fs = self.ft, self.fs
        b, _, t, h, w = x.shape
        x = x.repeat_interleave(self.repeats, dim=1)  # [B,out*ft*fs*fs,T,H,W]
        x = x.view(b, self.out_ch, ft, fs, fs, t, h, w)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)  # [B,out,T,ft,H,fs,W,fs]
        x = x.reshape(b, self.out_ch, t * ft, h * fs, w * fs)  # [B,out,T*ft,H*fs,W*fs]
        return x[:, :, ft - 1:] if first_chunk else x


def patchify(x: Tensor, p: int) -> Tensor:
    """[B,C,T,H,W] -> [B,C*p*p,T,H/p,W/p]; channel order (c, dx, dy) as in Wan2.2."""
    if p == 1:
        return x
    b, c, t, h, w = x.shape
    x = x.view(b, c, t, h // p, p, w // p, p)  # [B,C,T,h,dy,w,dx]
    x = x.permute(0, 1, 6, 4, 2, 3, 5)  # [B,C,dx,dy,T,h,w]
    return x.reshape(b, c * p * p, t, h // p, w // p)


def unpatchify(x: Tensor, p: int) -> Tensor:
    """Inverse of patchify: [B,C*p*p,T,h,w] -> [B,C,T,h*p,w*p]."""
    if p == 1:
        return x
    b, cpp, t, h, w = x.shape
    x = x.view(b, cpp // (p * p), p, p, t, h, w)  # [B,C,dx,dy,T,h,w]
    x = x.permute(0, 1, 4, 5, 3, 6, 2)  # [B,C,T,h,dy,w,dx]
    return x.reshape(b, cpp // (p * p), t, h * p, w * p)
