"""decode_distributed on CPU with gloo: the video rank 0 assembles from tiles decoded on 2 and 3 ranks equals the
single-process tiled decode with the same layout, bit for bit (one intra-op thread everywhere, so every rank runs
the same kernels as the parent); the other ranks get None; every rank with a tile decodes its share.

One spawn per world size runs all of that world's cases (process start-up dominates on 2 cores); the parent
computes the references.  The cases cover: a layout that 2 ranks divide and 3 do not (placeholder tiles in the
last round), the default layout shrunk so that every rank gets a tile (2.2), and a frame too small to split (2.1
defaults: one tile, the other ranks idle).
"""
from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

from renderer.parallel import ParallelConfig, init_group
from renderer.parallel.group import RenderGroup
from renderer.vae import build_vae
from renderer.vae.model import plan_tiles
from renderer.vae.parallel_decode import decode_distributed, group_tile_args

# (name, version, latent shape [t, h, w], tile_size, tile_overlap); z channels come from the VAE
CASES = [
    ("2.1-explicit", "2.1", (3, 12, 16), (8, 7), (2, 3)),  # 2 x 4 = 8 tiles
    ("2.2-shrunk", "2.2", (2, 12, 16), None, None),  # default 16-px tiles: 1 tile, shrunk to one per rank
    ("2.1-too-small", "2.1", (2, 12, 16), None, None),  # overlap 8 leaves no room to split 12 x 16: one tile
]


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """One intra-op thread: the spawned ranks share 2 cores, and the parent must run the kernels they run."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _latent(version: str, shape: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    z_dim = 16 if version == "2.1" else 48
    return torch.randn(1, z_dim, *shape, generator=torch.Generator().manual_seed(seed))  # [1, z, t, h, w]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_path: str) -> None:
    torch.set_num_threads(1)
    group = init_group(ParallelConfig(ulysses=world), "gloo", rank=rank, world_size=world,
                       master_addr="127.0.0.1", master_port=port)
    vaes = {v: build_vae(v, tiny=True, seed=0) for v in ("2.1", "2.2")}
    calls = {v: 0 for v in vaes}
    for v, vae in vaes.items():  # count the tiles this rank decodes
        def counted(z, tile, _decode=vae.decode_tile, _v=v):
            calls[_v] += 1
            return _decode(z, tile)

        vae.decode_tile = counted
    results = {}
    for name, version, shape, size, overlap in CASES:
        before = calls[version]
        video = decode_distributed(vaes[version], _latent(version, shape), group, tile_size=size,
                                   tile_overlap=overlap)
        results[name] = (video, calls[version] - before)
    torch.save(results, f"{out_path}.rank{rank}")
    group.close()


def _run_world(world: int, tmp_path) -> list[dict]:
    out = tmp_path / f"world{world}"
    mp.spawn(_worker, args=(world, _free_port(), str(out)), nprocs=world, join=True)
    return [torch.load(f"{out}.rank{r}", weights_only=True) for r in range(world)]  # tensors and plain values only


_VAES: dict = {}


def _vae(version: str):
    if version not in _VAES:
        _VAES[version] = build_vae(version, tiny=True, seed=0)
    return _VAES[version]


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_decode_equals_tiled_decode(world, tmp_path):
    ranks = _run_world(world, tmp_path)
    for name, version, shape, size, overlap in CASES:
        vae, latent = _vae(version), _latent(version, shape)
        lay_size, lay_overlap = group_tile_args(vae, shape[1], shape[2], world, size, overlap)
        if size is not None:  # explicit tile arguments are honoured as given
            assert (lay_size, lay_overlap) == vae.tile_args(size, overlap), name
        ref = vae.decode(latent, tile=True, tile_size=lay_size, tile_overlap=lay_overlap)  # [1, 3, F, H, W]
        video, _ = ranks[0][name]
        assert video.shape == ref.shape and torch.equal(video, ref), (name, world, (video - ref).abs().max())
        assert all(ranks[r][name][0] is None for r in range(1, world)), name
        # tile i goes to rank i % world: every rank works when there are enough tiles
        n = len(plan_tiles(shape[1], shape[2], lay_size, lay_overlap, 1))
        assert [ranks[r][name][1] for r in range(world)] == [len(range(r, n, world)) for r in range(world)], name
        if name == "2.2-shrunk":
            assert n == world  # the default single tile was shrunk to one tile per rank
        if name == "2.1-too-small":
            assert n == 1 and (lay_size, lay_overlap) == vae.tile_args()  # kept the default, others idle


def test_single_process_paths_are_the_plain_tiled_decode():
    vae = _vae("2.1")
    latent = _latent("2.1", (2, 6, 8), seed=1)
    for size, overlap in [(4, 1), (None, None)]:
        ref = vae.decode(latent, tile=True, tile_size=size, tile_overlap=overlap)
        assert torch.equal(decode_distributed(vae, latent, None, tile_size=size, tile_overlap=overlap), ref)
        one = RenderGroup(ParallelConfig())  # world_size 1, no process group
        assert torch.equal(decode_distributed(vae, latent, one, tile_size=size, tile_overlap=overlap), ref)


def test_group_tile_args_shrinks_only_when_ranks_would_idle():
    vae = _vae("2.2")  # default 16-px tiles overlapping by 4
    assert group_tile_args(vae, 44, 80, 4) == vae.tile_args()  # TI2V-5B 1280x704: 28 tiles, enough for 4 ranks
    assert group_tile_args(vae, 12, 16, 1) == vae.tile_args()
    assert group_tile_args(vae, 12, 16, 4, 16, 4) == ((16, 16), (4, 4))  # explicit: honoured, 3 ranks idle
    for world in (2, 3, 4, 6):
        size, overlap = group_tile_args(vae, 12, 16, world)
        assert overlap == (4, 4) and size[0] <= 16 and size[1] <= 16  # never larger than the default
        assert min(size) >= 8  # never narrower than two overlaps
        assert len(plan_tiles(12, 16, size, overlap, 1)) >= world
    size, overlap = group_tile_args(vae, 12, 16, 64)  # more ranks than the frame can feed: as many tiles as it can
    assert len(plan_tiles(12, 16, size, overlap, 1)) == 2 * 3


def test_per_rank_layout():
    """tile_size="per_rank": a 2 x 2 grid of quarter frames on 4 ranks; the whole frame (untiled) on one."""
    vae = _vae("2.2")
    assert group_tile_args(vae, 44, 80, 4, "per_rank") == ((24, 42), (4, 4))  # 1280x704: 4 tiles, not 28
    assert group_tile_args(vae, 44, 80, 1, "per_rank") == ((44, 80), (4, 4))
    latent = _latent("2.2", (2, 6, 8), seed=2)
    assert torch.equal(decode_distributed(vae, latent, None, tile_size="per_rank"), vae.decode(latent))
