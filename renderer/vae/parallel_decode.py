"""VAE decode of one shot split across the GPUs of its render group — the same frames as one GPU, untiled.

Why a spatial split with halo exchange (and not time, channels or tiles):
* Time: the decoders are causal and stream one latent frame at a time through
  a per-layer cache (StreamState).  Through ~30 stacked causal convs, frame i
  depends on many earlier latent frames, so a rank that starts mid-video must
  first replay that whole receptive field (most of a 21-frame latent) or be
  wrong: little work is left to split.
* Channels: every 3x3 conv needs all input channels, so a channel split
  all-gathers full-resolution activations at every layer: exact, but the
  traffic is the whole activation volume and grows with the rank count.
* Independent tiles (decode(tile=True)) see only their own box: seams are
  cross-faded, and the frames differ from the untiled decode (up to 0.12 on a
  random VAE).  That path is kept, for an explicit tile_size.
* Halo exchange: each rank keeps a contiguous band of every frame (rows or
  columns of the latent, the longer axis) at every resolution — the decoder
  only ever upsamples by exact factors, so a band stays a band.  The layers
  that look across pixels are 3x3 convs (they receive one border row/column
  from each neighbour instead of zero padding: the same numbers the unsplit
  conv reads), the nearest 2x upsample (pixel-local), RMSNorm/SiLU/
  depth-to-space (pixel-local), and the middle block's frame-wide attention
  (each rank gathers the frame once, at latent resolution, and attends with its
  own queries to all keys in global order).  The causal caches hold each
  rank's band with its halo, so the temporal stream is untouched.  The result
  is the untiled decode up to floating-point summation order (measured on
  CPU/fp32: at most 2e-6 on the tiny random VAEs), work and activation memory per rank are 1/world plus two
  border lines per conv, and the traffic per conv is two lines per rank.

Collectives: P2P between neighbours (halo), P2P all-to-all of the small
latent-resolution frame (attention), and rank 0 receiving each decoded chunk
(1 or 4 frames) from the others.  A latent narrower than the group along the
split axis leaves the last ranks idle (they return None at once).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .layers import StreamState
from .model import Tile, WanVAE, plan_tiles


def split_sizes(length: int, parts: int) -> list[int]:
    """Balanced contiguous shares of `length` latent lines over `parts` ranks (the first ones get the remainder)."""
    base, extra = divmod(length, parts)
    return [base + (r < extra) for r in range(parts)]


@dataclass
class HaloSplit:
    """This rank's band of every frame and the exchanges the VAE layers ask for (see SpatialSplit).

    sizes: the latent-resolution band widths of the active ranks 0..len(sizes)-1;
    at any layer a band is sizes[r] * f lines, f being the upsampling so far.
    """

    rank: int
    sizes: list[int]
    axis: int  # 3: bands of rows, 4: bands of columns of [B,C,T,H,W]

    def _factor(self, x: Tensor) -> int:
        n = x.shape[self.axis]
        if n % self.sizes[self.rank]:
            raise RuntimeError(f"band of {n} lines is not a multiple of this rank's {self.sizes[self.rank]}")
        return n // self.sizes[self.rank]

    def _shape(self, x: Tensor, lines: int) -> list[int]:
        shape = list(x.shape)
        shape[self.axis] = lines
        return shape

    def halo(self, x: Tensor, width: int) -> Tensor:
        n, last = x.shape[self.axis], len(self.sizes) - 1
        if width > n:
            raise RuntimeError(f"halo of {width} lines is wider than this rank's band of {n}")
        before = x.new_zeros(self._shape(x, width))  # [.., width, ..] zeros: the frame edge
        after = x.new_zeros(self._shape(x, width))
        ops = []
        if self.rank > 0:  # my first lines go up, the upper neighbour's last lines come down
            ops += [dist.P2POp(dist.isend, x.narrow(self.axis, 0, width).contiguous(), self.rank - 1),
                    dist.P2POp(dist.irecv, before, self.rank - 1)]
        if self.rank < last:
            ops += [dist.P2POp(dist.isend, x.narrow(self.axis, n - width, width).contiguous(), self.rank + 1),
                    dist.P2POp(dist.irecv, after, self.rank + 1)]
        _run(ops)
        return torch.cat([before, x, after], dim=self.axis)  # [.., n + 2*width, ..]

    def gather(self, x: Tensor) -> Tensor:
        f = self._factor(x)
        mine = x.contiguous()
        parts = [mine if r == self.rank else x.new_empty(self._shape(x, size * f)) for r, size in enumerate(self.sizes)]
        ops = []
        for r, part in enumerate(parts):
            if r != self.rank:
                ops += [dist.P2POp(dist.isend, mine, r), dist.P2POp(dist.irecv, part, r)]
        _run(ops)
        return torch.cat(parts, dim=self.axis)  # [.., sum(sizes) * f, ..] the whole frame


def _run(ops: list) -> None:
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()


def _check_same_latent(latent: Tensor, group) -> None:
    """Every rank must decode the same latent: compare shapes on every rank, so that all of them refuse together
    rather than some waiting forever for the others. This collective over the whole group also lets the later
    P2P calls involve only some ranks, as NCCL's batched P2P requires."""
    shape = torch.tensor(list(latent.shape), dtype=torch.int64, device=group.device)  # [5]
    both = torch.cat([shape, -shape])  # [10]: one MAX gives the largest and (negated) the smallest of each dim
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    largest, smallest = both[:5], -both[5:]
    if not torch.equal(largest, smallest):
        raise ValueError(f"decode_distributed: the ranks hold latents of different shapes (between "
                         f"{tuple(smallest.tolist())} and {tuple(largest.tolist())}; rank {group.rank}: "
                         f"{tuple(latent.shape)}); every rank must pass the same latent")


@torch.no_grad()
def decode_split(vae: WanVAE, latent: Tensor, group) -> Tensor | None:
    """Untiled decode of a normalised latent [B,z,t,h,w] with each rank of `group` decoding one band of every frame.

    Every rank calls this with the same latent.  Rank 0 returns the video
    [B,3,1+4(t-1),H,W] in [-1,1] (fp32), equal to `vae.decode(latent,
    tile=False)` up to summation order; the others return None.
    """
    b, zc, t, h, w = latent.shape
    if zc != vae.z_dim:
        raise ValueError(f"latent has {zc} channels, this VAE has z_dim={vae.z_dim}")
    _check_same_latent(latent, group)
    axis = 3 if h >= w else 4  # the longer axis: more ranks can take part, the borders are shorter
    sizes = split_sizes(latent.shape[axis], min(group.world_size, latent.shape[axis]))
    if group.rank >= len(sizes):
        return None  # more ranks than latent lines: this one has no band
    st, s, _ = vae.stride
    start = sum(sizes[: group.rank])
    z = vae.unnormalise(latent.narrow(axis, start, sizes[group.rank]))  # [B,z,t,h',w'] this band
    state = StreamState(split=HaloSplit(group.rank, sizes, axis))
    out = torch.empty(b, 3, 1 + st * (t - 1), h * s, w * s, device=vae.device) if group.rank == 0 else None
    pos = 0
    for i in range(t):
        frames = vae.decode_chunk(z[:, :, i : i + 1], state)  # [B,3,1|4,band] clamped, fp32
        if group.rank != 0:
            _run([dist.P2POp(dist.isend, frames.contiguous(), 0)])
            continue
        parts = [frames]
        for size in sizes[1:]:
            shape = list(frames.shape)
            shape[axis] = size * s
            parts.append(frames.new_empty(shape))  # [B,3,1|4,band of rank r]
        _run([dist.P2POp(dist.irecv, part, r) for r, part in enumerate(parts) if r])
        n = frames.shape[2]
        out[:, :, pos : pos + n] = torch.cat(parts, dim=axis)  # [B,3,1|4,H,W]
        pos += n
    return out


def _round_robin(vae: WanVAE, z: Tensor, tiles: list[Tile], rank: int, world: int) -> Iterator[tuple[Tile, Tensor]]:
    """Decode this rank's tiles and gather them on rank 0, which gets (tile, video) in plan order.

    Every rank runs the same number of rounds and calls gather once per round,
    so the collectives match; on ranks other than 0 this yields nothing.
    """
    b, t = z.shape[0], z.shape[2]
    s = vae.stride[1]
    frames_out = 1 + vae.stride[0] * (t - 1)
    hmax = max(tile.y1 - tile.y0 for tile in tiles) * s
    wmax = max(tile.x1 - tile.x0 for tile in tiles) * s
    for first in range(0, len(tiles), world):
        mine = first + rank
        if mine < len(tiles):
            video = vae.decode_tile(z, tiles[mine])  # [B,3,T,Ht,Wt] fp32
            # pad right/bottom to the common shape: gather needs one shape from every rank
            video = F.pad(video, (0, wmax - video.shape[-1], 0, hmax - video.shape[-2]))  # [B,3,T,Hmax,Wmax]
        else:  # the last round has fewer tiles than ranks: send a placeholder that rank 0 drops
            video = torch.zeros(b, 3, frames_out, hmax, wmax, device=vae.device)  # [B,3,T,Hmax,Wmax]
        bufs = [torch.empty_like(video) for _ in range(world)] if rank == 0 else None  # world x [B,3,T,Hmax,Wmax]
        dist.gather(video, bufs, dst=0)
        if rank == 0:
            for k, buf in enumerate(bufs):
                if first + k < len(tiles):
                    tile = tiles[first + k]
                    yield tile, buf[..., : (tile.y1 - tile.y0) * s, : (tile.x1 - tile.x0) * s]  # [B,3,T,Ht,Wt]


@torch.no_grad()
def decode_tiles_distributed(vae: WanVAE, latent: Tensor, group, tile_size: int | tuple[int, int],
                             tile_overlap: int | tuple[int, int] | None = None) -> Tensor | None:
    """The *tiled* decode with its tiles dealt round-robin over the ranks; rank 0 blends them.

    Equals `vae.decode(latent, tile=True, tile_size=..., tile_overlap=...)` (bit for bit with deterministic
    kernels), which differs from the untiled decode at the seams: for a user who asked for tiles.
    """
    if latent.shape[1] != vae.z_dim:
        raise ValueError(f"latent has {latent.shape[1]} channels, this VAE has z_dim={vae.z_dim}")
    size, overlap = vae.tile_args(tile_size, tile_overlap)
    tiles = plan_tiles(latent.shape[3], latent.shape[4], size, overlap, vae.stride[1])
    decoded = _round_robin(vae, vae.unnormalise(latent), tiles, group.rank, group.world_size)
    if group.rank != 0:
        for _ in decoded:  # drive the rounds: decode own tiles, send them to rank 0
            pass
        return None
    return vae.blend_tiles(decoded, latent.shape)  # [B,3,T,H,W]


@torch.no_grad()
def decode_distributed(vae: WanVAE, latent: Tensor, group=None, tile_size: int | tuple[int, int] | str | None = None,
                       tile_overlap: int | tuple[int, int] | None = None) -> Tensor | None:
    """Decode a normalised latent [B,z,t,h,w] shared by all ranks of `group` (a RenderGroup); rank 0 gets the video.

    tile_size None (or "per_rank", the name of the former one-tile-per-rank layout): the exact split
    (decode_split), equal to one process decoding untiled.  An explicit tile_size: the tiled decode with the
    tiles spread over the ranks (decode_tiles_distributed).  Without a distributed group (None or one rank)
    this is `vae.decode(latent, tile=False)`, or the tiled decode for an explicit tile_size.  The other ranks
    return None.  Frames travel over the default process group, so on NCCL the VAE must be on group.device.
    """
    exact = tile_size is None or tile_size == "per_rank"
    if group is None or not group.distributed:
        if exact:
            return vae.decode(latent, tile=False)
        return vae.decode(latent, tile=True, tile_size=tile_size, tile_overlap=tile_overlap)
    if not dist.is_initialized():
        raise RuntimeError("decode_distributed: the render group is distributed but no process group is initialised")
    if exact:
        return decode_split(vae, latent, group)
    return decode_tiles_distributed(vae, latent, group, tile_size, tile_overlap)


__all__ = ["decode_distributed", "decode_split", "decode_tiles_distributed", "split_sizes", "HaloSplit"]
