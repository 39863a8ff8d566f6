"""WanVAE: the Wan2.1 / Wan2.2 video autoencoder with streaming encode/decode.

Strides: Wan2.1 compresses t4 x h8 x w8 into 16 latent channels; Wan2.2 first
folds 2x2 pixels into channels (patchify) and then compresses t4 x h8 x w8
again, i.e. t4 x h16 x w16 into 48 channels.  The first frame of a video is
always coded on its own (F = 4n+1 frames <-> n+1 latent frames).

Latents handed in and out are *normalised* per channel with the constants the
diffusion models were trained with: z_norm = (mu - mean) / std.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from .layers import CausalConv3d, StreamState, assign_cache_keys, patchify, unpatchify
from .nets import Decoder21, Decoder22, Encoder21, Encoder22

# Per-channel statistics of the latents, from the official release.
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)
WAN22_LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
WAN22_LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)


@dataclass(frozen=True)
class VAEConfig:
    version: str  # "2.1" or "2.2"
    base_dim: int  # encoder width at full resolution
    decoder_dim: int  # decoder width at full resolution
    z_dim: int
    latents_mean: tuple[float, ...]
    latents_std: tuple[float, ...]
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)  # per encoder level
    patch_size: int = 1  # Wan2.2: 2

    @staticmethod
    def official(version: str) -> "VAEConfig":
        if version == "2.1":
            return VAEConfig("2.1", 96, 96, 16, WAN21_LATENTS_MEAN, WAN21_LATENTS_STD)
        if version == "2.2":
            return VAEConfig("2.2", 160, 256, 48, WAN22_LATENTS_MEAN, WAN22_LATENTS_STD, patch_size=2)
        raise ValueError(f"unknown Wan VAE version {version!r} (expected '2.1' or '2.2')")


@dataclass
class TileConfig:
    """Spatial tiling of decode(), in *latent* pixels.

    Tiles of `size` latent pixels overlap by `overlap`; in the overlap the two
    decoded tiles are cross-faded linearly.  `tile=None` in decode() tiles only
    when `auto_above` is set and the latent frame has more pixels than that.
    """

    size: tuple[int, int]
    overlap: tuple[int, int]
    auto_above: int | None = None


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _tile_starts(length: int, size: int, overlap: int) -> list[int]:
    """Start offsets of tiles of `size` covering [0, length), stepping size-overlap."""
    if length <= size:
        return [0]
    step = max(size - overlap, 1)
    starts = list(range(0, length - size + 1, step))
    if starts[-1] + size < length:
        starts.append(length - size)  # last tile flush with the edge
    return starts


def _ramp(n: int, fade_in: int, fade_out: int) -> Tensor:
    """1D blend weights of one tile: linear fade over the overlap with each neighbour.

    Where two tiles overlap by L pixels their ramps are (i+0.5)/L and
    (L-i-0.5)/L, which sum to 1, so plain overlap-averaging is seamless.
    """
    i = torch.arange(n, dtype=torch.float32) + 0.5
    w = torch.ones(n)
    if fade_in:
        w = torch.minimum(w, i / fade_in)
    if fade_out:
        w = torch.minimum(w, (n - i) / fade_out)
    return w


@dataclass(frozen=True)
class Tile:
    """One tile of a tiled decode: a box in latent pixels and its fades, in output pixels.

    A tile fades only towards real neighbours, by exactly its overlap with them,
    so the cross-fade weights of all tiles covering a pixel sum to 1.
    """

    y0: int
    y1: int
    x0: int
    x1: int
    fade: tuple[int, int, int, int]  # (top, bottom, left, right)

    def weight(self, s: int) -> Tensor:
        """Cross-fade weights [(y1-y0)*s, (x1-x0)*s] of this tile's decoded pixels."""
        top, bottom, left, right = self.fade
        wy = _ramp((self.y1 - self.y0) * s, top, bottom)  # [Ht]
        return wy[:, None] * _ramp((self.x1 - self.x0) * s, left, right)[None, :]  # [Ht,Wt]


def plan_tiles(h: int, w: int, size: tuple[int, int], overlap: tuple[int, int], s: int) -> list[Tile]:
    """The tiles covering an h x w latent frame, row-major: the order decode() blends them in.

    s is the spatial stride (latent -> output pixels).  The distributed decode
    deals out these same tiles, so both paths share layout and blending order.
    """
    ys = _tile_starts(h, size[0], overlap[0])
    xs = _tile_starts(w, size[1], overlap[1])
    tiles = []
    for iy, y0 in enumerate(ys):
        y1 = min(y0 + size[0], h)
        top = (ys[iy - 1] + size[0] - y0) * s if iy > 0 else 0
        bottom = (y1 - ys[iy + 1]) * s if iy + 1 < len(ys) else 0
        for ix, x0 in enumerate(xs):
            x1 = min(x0 + size[1], w)
            left = (xs[ix - 1] + size[1] - x0) * s if ix > 0 else 0
            right = (x1 - xs[ix + 1]) * s if ix + 1 < len(xs) else 0
            tiles.append(Tile(y0, y1, x0, x1, (top, bottom, left, right)))
    return tiles


class WanVAE(nn.Module):
    """Wan2.1 / Wan2.2 video VAE.  Parameter names match the official .pth files."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.version = config.version
        self.z_dim = config.z_dim
        levels = len(config.dim_mult) - 1
        self.stride = (2 ** sum(config.temporal_downsample), 2**levels * config.patch_size,
                       2**levels * config.patch_size)
        if len(config.latents_mean) != config.z_dim or len(config.latents_std) != config.z_dim:
            raise ValueError("latents_mean/std must have z_dim entries")
        pixels = 3 * config.patch_size**2  # channels the trunks see
        enc_cls, dec_cls = (Encoder21, Decoder21) if config.version == "2.1" else (Encoder22, Decoder22)
        self.encoder = enc_cls(config.base_dim, 2 * config.z_dim, config.dim_mult, config.num_res_blocks,
                               config.temporal_downsample, in_ch=pixels)
        # 1x1x1 convs between trunk and latent; conv1 outputs (mu, log_var)
        self.conv1 = CausalConv3d(2 * config.z_dim, 2 * config.z_dim, 1)
        self.conv2 = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = dec_cls(config.decoder_dim, config.z_dim, config.dim_mult, config.num_res_blocks,
                               tuple(reversed(config.temporal_downsample)), out_ch=pixels)
        assign_cache_keys(self)
        # defaults for tiled decode: 256-pixel tiles overlapping by 64 pixels
        s = self.stride[1]
        self.tiling = TileConfig(size=(max(256 // s, 1),) * 2, overlap=(max(64 // s, 1),) * 2)

    # ------------------------------------------------------------------ helpers
    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        shape = (1, self.z_dim, 1, 1, 1)
        mean = torch.tensor(self.config.latents_mean, dtype=like.dtype, device=like.device).view(shape)
        std = torch.tensor(self.config.latents_std, dtype=like.dtype, device=like.device).view(shape)
        return mean, std

    @property
    def dtype(self) -> torch.dtype:
        return self.conv1.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv1.weight.device

    # ------------------------------------------------------------------- encode
    @torch.no_grad()
    def encode(self, video: Tensor) -> Tensor:
        """[B,3,F,H,W] in [-1,1], F=4n+1 -> normalised latent [B,z,n+1,H/s,W/s] (fp32)."""
        b, c, f, h, w = video.shape
        st, ss, _ = self.stride
        if c != 3 or (f - 1) % st or h % ss or w % ss:
            raise ValueError(f"encode expects [B,3,{st}n+1,H,W] with H, W multiples of {ss}; got {tuple(video.shape)}")
        x = patchify(video.to(self.device, self.dtype), self.config.patch_size)  # [B,3p²,F,H/p,W/p]
        state = StreamState()
        mus = []
        # the first frame alone, then `st` frames at a time: each chunk -> one latent frame
        for start, stop in [(0, 1)] + [(i, i + st) for i in range(1, f, st)]:
            h_ = self.encoder(x[:, :, start:stop], state)  # [B,2z,1,h,w]
            mus.append(self.conv1(h_)[:, : self.z_dim].float())  # [B,z,1,h,w] (log_var dropped)
        mu = torch.cat(mus, dim=2)  # [B,z,n+1,h,w]
        mean, std = self._stats(mu)
        return (mu - mean) / std

    # ------------------------------------------------------------------- decode
    @torch.no_grad()
    def decode_chunk(self, z: Tensor, state: StreamState, clamp: bool = True) -> Tensor:
        """Decode latent frames that continue the stream in `state` (un-normalised z).

        z: [B,z,t,h,w] -> [B,3,T,h*s,w*s] fp32, where T = 1 + 4(t-1) for the first
        chunk of a stream and 4t afterwards.  The reference feeds one latent frame
        per chunk; this is what decode() does, keeping memory flat in video length.
        """
        x = self.conv2(z.to(self.device, self.dtype))  # [B,z,t,h,w]
        out = []
        for i in range(x.shape[2]):
            y = self.decoder(x[:, :, i : i + 1], state)  # [B,3p²,1 or 4,h*s/p,w*s/p]
            out.append(unpatchify(y, self.config.patch_size).float())  # [B,3,1|4,h*s,w*s]
        y = torch.cat(out, dim=2) if len(out) > 1 else out[0]
        return y.clamp_(-1.0, 1.0) if clamp else y

    @torch.no_grad()
    def decode(self, latent: Tensor, tile: bool | None = None, *, tile_size: int | tuple[int, int] | None = None,
               tile_overlap: int | tuple[int, int] | None = None) -> Tensor:
        """Normalised latent [B,z,t,h,w] -> video [B,3,1+4(t-1),h*s,w*s] in [-1,1] (fp32).

        Decoding streams one latent frame at a time.  tile=True additionally
        splits each frame spatially into overlapping tiles (see TileConfig) that
        are decoded independently and cross-faded; tile=None follows
        self.tiling.auto_above.
        """
        b, zc, t, h, w = latent.shape
        if zc != self.z_dim:
            raise ValueError(f"latent has {zc} channels, this VAE has z_dim={self.z_dim}")
        z = self.unnormalise(latent)  # [B,z,t,h,w]
        if tile is None:
            tile = self.tiling.auto_above is not None and h * w > self.tiling.auto_above
        if tile:
            return self._decode_tiled(z, *self.tile_args(tile_size, tile_overlap))
        st, s, _ = self.stride
        out = torch.empty(b, 3, 1 + st * (t - 1), h * s, w * s, device=self.device)  # fp32 video
        state = StreamState()
        pos = 0
        for i in range(t):
            frames = self.decode_chunk(z[:, :, i : i + 1], state)  # [B,3,1|4,H,W]
            out[:, :, pos : pos + frames.shape[2]] = frames
            pos += frames.shape[2]
        return out

    def unnormalise(self, latent: Tensor) -> Tensor:
        """Normalised latent -> the VAE's own scale (what decode_chunk/decode_tile take)."""
        mean, std = self._stats(latent)
        return latent * std + mean  # [B,z,t,h,w]

    def tile_args(self, tile_size: int | tuple[int, int] | None = None,
                  tile_overlap: int | tuple[int, int] | None = None) -> tuple[tuple[int, int], tuple[int, int]]:
        """decode()'s tile_size/tile_overlap with self.tiling's defaults filled in: (size, overlap) pairs."""
        overlap = self.tiling.overlap if tile_overlap is None else tile_overlap
        return _pair(tile_size or self.tiling.size), _pair(overlap)

    @torch.no_grad()
    def decode_tile(self, z: Tensor, tile: Tile) -> Tensor:
        """Decode one tile of un-normalised z [B,z,t,h,w] as its own stream -> [B,3,T,Ht,Wt] fp32, unclamped."""
        state = StreamState()  # every tile is its own stream
        box = z[:, :, :, tile.y0 : tile.y1, tile.x0 : tile.x1]  # [B,z,t,ht,wt]
        frames = [self.decode_chunk(box[:, :, i : i + 1], state, clamp=False) for i in range(z.shape[2])]
        return torch.cat(frames, dim=2) if len(frames) > 1 else frames[0]  # [B,3,T,Ht,Wt]

    def blend_tiles(self, decoded: Iterable[tuple[Tile, Tensor]], latent_shape: Sequence[int]) -> Tensor:
        """Cross-fade decoded tiles (in plan_tiles order) into the video of a latent of latent_shape.

        Takes an iterable so that a caller can decode (or receive) one tile at a
        time: only one tile's video is held besides the output.
        """
        b, _, t, h, w = latent_shape
        st, s, _ = self.stride
        acc = torch.zeros(b, 3, 1 + st * (t - 1), h * s, w * s, device=self.device)  # weighted sum
        wsum = torch.zeros(h * s, w * s, device=self.device)  # total weight per pixel
        for tile, frames in decoded:
            weight = tile.weight(s).to(self.device)  # [Ht,Wt]
            ys, xs = slice(tile.y0 * s, tile.y1 * s), slice(tile.x0 * s, tile.x1 * s)
            acc[:, :, :, ys, xs] += frames * weight  # frames [B,3,T,Ht,Wt]
            wsum[ys, xs] += weight
        return acc.div_(wsum).clamp_(-1.0, 1.0)

    def _decode_tiled(self, z: Tensor, size: tuple[int, int], overlap: tuple[int, int]) -> Tensor:
        tiles = plan_tiles(z.shape[3], z.shape[4], size, overlap, self.stride[1])
        return self.blend_tiles(((tile, self.decode_tile(z, tile)) for tile in tiles), z.shape)


def latent_frames(num_frames: int, temporal_stride: int = 4) -> int:
    """Latent frames for a video of `num_frames` = 4n+1 frames."""
    return (num_frames - 1) // temporal_stride + 1


def video_frames(num_latent_frames: int, temporal_stride: int = 4) -> int:
    return 1 + temporal_stride * (num_latent_frames - 1)


__all__ = ["VAEConfig", "TileConfig", "Tile", "plan_tiles", "WanVAE", "latent_frames", "video_frames"]
