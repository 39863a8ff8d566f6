"""VAE decode of one shot split across the GPUs of its render group.

The Wan decoders are causal in time and carry a per-layer temporal cache from
one latent frame to the next (StreamState), so splitting a shot by time would
serialise the ranks on that cache.  Spatial tiles, on the other hand, are
already independent streams in the single-process tiled decode: each rank
decodes a share of exactly those tiles, and rank 0 cross-fades them in the same
order with the same weights.  The result therefore equals
`vae.decode(latent, tile=True, tile_size=..., tile_overlap=...)` for the layout
`group_tile_args` returns (bit for bit when each rank's kernels are
deterministic, as on CPU).

Collective pattern: tiles are dealt round-robin (tile i -> rank i % world); in
round r every rank decodes tile r*world + rank and one `dist.gather` brings the
round's tiles to rank 0, which blends them while the others decode round r+1.
Tile shapes follow from the layout, which every rank computes itself, so no
shapes are exchanged.  plan_tiles places the last tile flush with the frame
edge, so all tiles of a layout have one shape today; tiles are still padded to
the largest one because gather needs a single shape and the layout code may
change.  Rank 0 holds one round of tiles besides the output video.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .model import Tile, WanVAE, plan_tiles


def _fits(length: int, parts: int, overlap: int, cap: int) -> int | None:
    """The tile size that covers `length` with `parts` tiles overlapping by `overlap`, or None.

    None when no such size exists within `cap` (the configured tile size, which
    bounds decode memory) or when tiles would be narrower than two overlaps:
    then the fade-in and fade-out of a tile would meet and three tiles would
    share pixels, which costs work and blurs more than it parallelises.
    """
    if parts == 1:
        return min(length, cap)
    size = math.ceil((length + (parts - 1) * overlap) / parts)
    if size > cap or size < 2 * overlap or size >= length:
        return None
    return size


def group_tile_args(vae: WanVAE, h: int, w: int, world: int, tile_size: int | tuple[int, int] | str | None = None,
                    tile_overlap: int | tuple[int, int] | None = None) -> tuple[tuple[int, int], tuple[int, int]]:
    """The (size, overlap) decode_distributed uses for an h x w latent frame on `world` ranks.

    An explicit tile_size is honoured as given.  With tile_size=None the VAE's
    default size is used unless it yields fewer tiles than ranks; then the
    tiles shrink (never grow, never below two overlaps) to the grid that keeps
    the most ranks busy with the least decoded area per rank.  A frame too small
    to split that far leaves some ranks idle.

    tile_size="per_rank" lifts the cap to the whole frame: about one tile per
    rank (the whole frame, i.e. the untiled decode, on one rank).  The default
    256-pixel tiles redo ~1.8x the frame's area in overlaps and run small
    kernels: on 4 H200s this layout decoded TI2V-5B 1280x704x121 in 1.6 s
    against 3.1 s with the default tiles (untiled on one GPU: 5.0 s).  A tile
    of 1/world of the frame needs less memory than the untiled decode.
    """
    per_rank = tile_size == "per_rank"
    size, overlap = vae.tile_args(None if per_rank else tile_size, tile_overlap)
    if per_rank:
        size = (h, w)  # the cap: one tile can be the whole frame
    elif tile_size is not None or world <= 1 or len(plan_tiles(h, w, size, overlap, 1)) >= world:
        return size, overlap
    def key(sy: int, sx: int) -> tuple[int, int, int]:
        # most ranks busy, then the least latent area on the busiest rank, then the fewest seams
        n = len(plan_tiles(h, w, (sy, sx), overlap, 1))
        return -min(n, world), math.ceil(n / world) * min(sy, h) * min(sx, w), n

    best_key, best = key(*size), size  # the default layout stands unless a smaller tile beats it
    for ky in range(1, world + 1):
        for kx in range(1, world + 1):
            sy, sx = _fits(h, ky, overlap[0], size[0]), _fits(w, kx, overlap[1], size[1])
            if sy is None or sx is None:
                continue
            k = key(sy, sx)
            if k < best_key:
                best_key, best = k, (sy, sx)
    return best, overlap


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
def decode_distributed(vae: WanVAE, latent: Tensor, group=None,
                       tile_size: int | tuple[int, int] | str | None = None,
                       tile_overlap: int | tuple[int, int] | None = None) -> Tensor | None:
    """Tiled decode of a normalised latent [B,z,t,h,w] shared by all ranks of `group` (a RenderGroup).

    Every rank of the group must call this with the same latent (shape and
    values) and tile arguments.  Rank 0 returns the video [B,3,1+4(t-1),H,W] in
    [-1,1] (fp32), equal to `vae.decode(latent, tile=True, tile_size=size,
    tile_overlap=overlap)` with `size, overlap = group_tile_args(...)`; the other
    ranks return None.  Without a distributed group (None or one rank) this is
    exactly `vae.decode(latent, tile=True, tile_size=..., tile_overlap=...)`.
    tile_size="per_rank": about one tile per rank (see group_tile_args).

    The decoded tiles travel over the default process group, so on NCCL the VAE
    must live on the rank's GPU (group.device).
    """
    if group is None or not group.distributed:
        if tile_size == "per_rank":  # one rank: the whole frame is its tile
            tile_size = tuple(latent.shape[3:])
        return vae.decode(latent, tile=True, tile_size=tile_size, tile_overlap=tile_overlap)
    if not dist.is_initialized():
        raise RuntimeError("decode_distributed: the render group is distributed but no process group is initialised")
    b, zc, t, h, w = latent.shape
    if zc != vae.z_dim:
        raise ValueError(f"latent has {zc} channels, this VAE has z_dim={vae.z_dim}")
    size, overlap = group_tile_args(vae, h, w, group.world_size, tile_size, tile_overlap)
    tiles = plan_tiles(h, w, size, overlap, vae.stride[1])
    z = vae.unnormalise(latent)  # [B,z,t,h,w], identical on every rank
    decoded = _round_robin(vae, z, tiles, group.rank, group.world_size)
    if group.rank != 0:
        for _ in decoded:  # drive the rounds: decode own tiles, send them to rank 0
            pass
        return None
    return vae.blend_tiles(decoded, latent.shape)  # [B,3,T,H,W]


__all__ = ["decode_distributed", "group_tile_args"]
