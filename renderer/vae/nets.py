"""Encoder and decoder trunks of the Wan2.1 and Wan2.2 VAEs.

Both versions share the same skeleton:

    encoder: conv1 -> downsamples -> middle (res, attn, res) -> head (norm, SiLU, conv)
    decoder: conv1 -> middle -> upsamples -> head

Wan2.1 lists its residual blocks and resamplers flat in `downsamples` /
`upsamples`; Wan2.2 groups them per resolution level in blocks that add a
parameter-free space-to-depth (AvgDown3d) / depth-to-space (DupUp3d) shortcut.
Wan2.2 also works on 2x2-patchified frames (12 channels instead of 3).

Each forward() call processes one chunk of frames and advances the StreamState.
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .layers import AttentionBlock, AvgDown3d, CausalConv3d, DupUp3d, Resample, ResidualBlock, RMSNorm, StreamState


def _middle(dim: int) -> nn.ModuleList:
    return nn.ModuleList([ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim)])


def _head(dim: int, out_ch: int) -> nn.ModuleList:
    # slots 0/2 hold weights (head.0.gamma, head.2.*), slot 1 is the SiLU
    return nn.ModuleList([RMSNorm(dim), nn.SiLU(), CausalConv3d(dim, out_ch, 3, padding=1)])


class _Trunk(nn.Module):
    """conv1 -> stages -> middle -> head, with the stage list in between."""

    def _run(self, x: Tensor, state: StreamState, stages: nn.ModuleList, stages_first: bool) -> Tensor:
        x = self.conv1(x, state)  # [B,C0,T,H,W]
        order = (stages, self.middle) if stages_first else (self.middle, stages)
        for group in order:
            for layer in group:
                x = layer(x, state)
        norm, _, conv = self.head
        x = conv(F.silu(norm(x), inplace=True), state)  # [B,Cout,T,H,W]
        state.chunks_done += 1
        return x


class Encoder21(_Trunk):
    def __init__(self, dim: int, out_ch: int, dim_mult: tuple[int, ...], num_res_blocks: int,
                 temporal_down: tuple[bool, ...], in_ch: int = 3) -> None:
        super().__init__()
        dims = [dim * m for m in (1, *dim_mult)]
        self.conv1 = CausalConv3d(in_ch, dims[0], 3, padding=1)
        layers: list[nn.Module] = []
        c = dims[0]
        for level, width in enumerate(dims[1:]):
            for _ in range(num_res_blocks):
                layers.append(ResidualBlock(c, width))
                c = width
            if level < len(dim_mult) - 1:  # no resampling after the deepest level
                layers.append(Resample(c, "downsample3d" if temporal_down[level] else "downsample2d"))
        self.downsamples = nn.ModuleList(layers)
        self.middle = _middle(c)
        self.head = _head(c, out_ch)

    def forward(self, x: Tensor, state: StreamState) -> Tensor:
        return self._run(x, state, self.downsamples, stages_first=True)


class Decoder21(_Trunk):
    def __init__(self, dim: int, z_dim: int, dim_mult: tuple[int, ...], num_res_blocks: int,
                 temporal_up: tuple[bool, ...], out_ch: int = 3) -> None:
        super().__init__()
        dims = [dim * m for m in (dim_mult[-1], *reversed(dim_mult))]
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0])
        layers: list[nn.Module] = []
        c = dims[0]
        for level, width in enumerate(dims[1:]):
            for _ in range(num_res_blocks + 1):
                layers.append(ResidualBlock(c, width))
                c = width
            if level < len(dim_mult) - 1:
                # Wan2.1's upsampling conv halves the width
                mode = "upsample3d" if temporal_up[level] else "upsample2d"
                layers.append(Resample(c, mode, out_dim=c // 2))
                c //= 2
        self.upsamples = nn.ModuleList(layers)
        self.head = _head(c, out_ch)

    def forward(self, x: Tensor, state: StreamState) -> Tensor:
        return self._run(x, state, self.upsamples, stages_first=False)


class DownBlock22(nn.Module):
    """Wan2.2 encoder level: residual blocks (+ resample) plus an AvgDown3d skip."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, down_t: bool, down_s: bool) -> None:
        super().__init__()
        self.avg_shortcut = AvgDown3d(in_dim, out_dim, 2 if down_t else 1, 2 if down_s else 1)
        layers: list[nn.Module] = []
        c = in_dim
        for _ in range(num_res_blocks):
            layers.append(ResidualBlock(c, out_dim))
            c = out_dim
        if down_s:
            layers.append(Resample(out_dim, "downsample3d" if down_t else "downsample2d"))
        self.downsamples = nn.ModuleList(layers)

    def forward(self, x: Tensor, state: StreamState) -> Tensor:
        h = x
        for layer in self.downsamples:
            h = layer(h, state)  # [B,out,T',H',W']
        return h + self.avg_shortcut(x)


class UpBlock22(nn.Module):
    """Wan2.2 decoder level: residual blocks (+ resample) plus a DupUp3d skip."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, up_t: bool, up_s: bool) -> None:
        super().__init__()
        self.avg_shortcut = DupUp3d(in_dim, out_dim, 2 if up_t else 1, 2) if up_s else None
        layers: list[nn.Module] = []
        c = in_dim
        for _ in range(num_res_blocks):
            layers.append(ResidualBlock(c, out_dim))
            c = out_dim
        if up_s:
            # unlike Wan2.1, the Wan2.2 upsampling conv keeps the width
            layers.append(Resample(out_dim, "upsample3d" if up_t else "upsample2d", out_dim=out_dim))
        self.upsamples = nn.ModuleList(layers)

    def forward(self, x: Tensor, state: StreamState) -> Tensor:
        h = x
        for layer in self.upsamples:
            h = layer(h, state)  # [B,out,T',H',W']
        if self.avg_shortcut is None:
            return h
        return h + self.avg_shortcut(x, first_chunk=state.first_chunk)


class Encoder22(_Trunk):
    def __init__(self, dim: int, out_ch: int, dim_mult: tuple[int, ...], num_res_blocks: int,
                 temporal_down: tuple[bool, ...], in_ch: int = 12) -> None:
        super().__init__()
        dims = [dim * m for m in (1, *dim_mult)]
        self.conv1 = CausalConv3d(in_ch, dims[0], 3, padding=1)
        last = len(dim_mult) - 1
        self.downsamples = nn.ModuleList(
            DownBlock22(dims[i], dims[i + 1], num_res_blocks,
                        down_t=i < last and temporal_down[i], down_s=i < last)
            for i in range(len(dim_mult))
        )
        self.middle = _middle(dims[-1])
        self.head = _head(dims[-1], out_ch)

    def forward(self, x: Tensor, state: StreamState) -> Tensor:
        return self._run(x, state, self.downsamples, stages_first=True)


class Decoder22(_Trunk):
    def __init__(self, dim: int, z_dim: int, dim_mult: tuple[int, ...], num_res_blocks: int,
                 temporal_up: tuple[bool, ...], out_ch: int = 12) -> None:
        super().__init__()
        dims = [dim * m for m in (dim_mult[-1], *reversed(dim_mult))]
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0])
        last = len(dim_mult) - 1
        self.upsamples = nn.ModuleList(
            UpBlock22(dims[i], dims[i + 1], num_res_blocks + 1,
                      up_t=i < last and temporal_up[i], up_s=i < last)
            for i in range(len(dim_mult))
        )
        self.head = _head(dims[-1], out_ch)

    def forward(self, x: Tensor, state: StreamState) -> Tensor:
        return self._run(x, state, self.upsamples, stages_first=False)
