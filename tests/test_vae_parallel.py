"""The render group's VAE decode on CPU with gloo, 2 and 3 ranks.

decode_distributed's default (the halo-exchange split, renderer/vae/parallel_decode.py) must give the frames of ONE
process decoding UNTILED (`vae.decode(latent, tile=False)`), within 1e-5 in fp32, for the Wan2.1 and Wan2.2 VAEs;
each rank must decode only its band (the input width its decoder sees is recorded); ranks other than 0 get None.
The cases cover bands of rows and of columns, uneven bands, one-line bands, several latent frames (the causal
caches and the temporal upsampling), and a latent narrower than the group (idle ranks). An explicit tile_size keeps
the tiled decode with its tiles spread over the ranks: equal to `vae.decode(tile=True, ...)` bit for bit.

One spawn per world size runs all of that world's cases (process start-up dominates on 2 cores); the parent
computes the references with one intra-op thread, as the ranks do.
"""
from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

from renderer.parallel import ParallelConfig, init_group
from renderer.parallel.group import RenderGroup
from renderer.vae import build_vae
from renderer.vae.parallel_decode import decode_distributed, split_sizes

# (name, version, latent [t, h, w], tile_size, tile_overlap); tile_size None: the exact split
CASES = [
    ("2.1-rows", "2.1", (3, 7, 5), None, None),  # h >= w: bands of rows, uneven on 2 and 3 ranks
    ("2.2-columns", "2.2", (3, 3, 8), None, None),  # w > h: bands of columns
    ("2.1-thin", "2.1", (2, 2, 3), None, None),  # 3 columns: one-line bands on 3 ranks
    ("2.2-idle", "2.2", (2, 2, 1), None, None),  # 2 rows: on 3 ranks the last one has no band
    ("2.1-tiled", "2.1", (2, 12, 16), (8, 7), (2, 3)),  # explicit tiles: the tiled decode, spread over the ranks
]
TOL = 1e-5


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
    seen: dict[str, list] = {v: [] for v in vaes}  # the latent shapes this rank's decoder was fed
    for v, vae in vaes.items():
        vae.decoder.conv1.register_forward_hook(lambda m, args, out, _v=v: seen[_v].append(list(args[0].shape)))
    results = {}
    for name, version, shape, size, overlap in CASES:
        seen[version].clear()
        video = decode_distributed(vaes[version], _latent(version, shape), group, tile_size=size,
                                   tile_overlap=overlap)
        results[name] = (video, [s[3:] for s in seen[version]])
    try:  # rank 1 passes a different latent: every rank must refuse, none may wait for the others
        decode_distributed(vaes["2.1"], _latent("2.1", (2, 4 + (rank == 1), 4)), group)
        results["mismatch"] = "decoded"
    except ValueError as e:
        results["mismatch"] = str(e)
    torch.save(results, f"{out_path}.rank{rank}")
    group.close()


_RUNS: dict[int, list[dict]] = {}


def _run_world(world: int, tmp_path) -> list[dict]:
    """Every rank's results for all cases, spawned once per world size (tests share them)."""
    if world not in _RUNS:
        out = tmp_path / f"world{world}"
        mp.spawn(_worker, args=(world, _free_port(), str(out)), nprocs=world, join=True)
        _RUNS[world] = [torch.load(f"{out}.rank{r}", weights_only=True) for r in range(world)]  # tensors, values
    return _RUNS[world]


_VAES: dict = {}


def _vae(version: str):
    if version not in _VAES:
        _VAES[version] = build_vae(version, tiny=True, seed=0)
    return _VAES[version]


@pytest.mark.parametrize("world", [2, 3])
def test_group_decode_equals_the_untiled_decode(world, tmp_path):
    ranks = _run_world(world, tmp_path)
    for name, version, shape, size, overlap in CASES:
        vae, latent = _vae(version), _latent(version, shape)
        video, _ = ranks[0][name]
        assert all(ranks[r][name][0] is None for r in range(1, world)), name
        if size is not None:  # explicit tiles: the tiled decode, bit for bit
            ref = vae.decode(latent, tile=True, tile_size=size, tile_overlap=overlap)  # [1, 3, F, H, W]
            assert video.shape == ref.shape and torch.equal(video, ref), (name, world)
            assert not torch.allclose(ref, vae.decode(latent), atol=TOL)  # and that is not the untiled decode
            continue
        ref = vae.decode(latent, tile=False)  # [1, 3, F, H, W]: one process, untiled
        err = (video - ref).abs().max().item()
        assert video.shape == ref.shape and err <= TOL, (name, world, err)
        print(f"{name} on {world} ranks: max abs err {err:.1e}")
        # every rank decoded one band of the longer axis, all latent frames of it, and nothing else
        h, w = shape[1:]
        axis = 0 if h >= w else 1
        bands = split_sizes(shape[1 + axis], min(world, shape[1 + axis]))
        for r in range(world):
            fed = ranks[r][name][1]  # [[h', w'] per latent frame]
            if r >= len(bands):
                assert fed == [], (name, r)  # idle: more ranks than lines
                continue
            band = [h, w]
            band[axis] = bands[r]
            assert fed == [band] * shape[0], (name, world, r, fed)


@pytest.mark.parametrize("world", [2])
def test_ranks_with_different_latents_all_refuse(world, tmp_path):
    ranks = _run_world(world, tmp_path)
    for r in range(world):
        msg = ranks[r]["mismatch"]
        assert "the ranks hold latents of different shapes" in msg and "every rank must pass the same latent" in msg
        assert "(1, 16, 2, 4, 4) and (1, 16, 2, 5, 4)" in msg, msg


def test_split_sizes():
    assert split_sizes(7, 3) == [3, 2, 2] and split_sizes(6, 3) == [2, 2, 2] and split_sizes(2, 2) == [1, 1]
    assert sum(split_sizes(90, 8)) == 90 and max(split_sizes(90, 8)) - min(split_sizes(90, 8)) == 1


def test_single_process_paths():
    """No group or a one-rank group: the untiled decode by default, the tiled one for explicit tiles."""
    vae = _vae("2.1")
    latent = _latent("2.1", (2, 6, 8), seed=1)
    one = RenderGroup(ParallelConfig())  # world_size 1, no process group
    for group in (None, one):
        assert torch.equal(decode_distributed(vae, latent, group), vae.decode(latent, tile=False))
        assert torch.equal(decode_distributed(vae, latent, group, tile_size="per_rank"), vae.decode(latent))
        ref = vae.decode(latent, tile=True, tile_size=4, tile_overlap=1)
        assert torch.equal(decode_distributed(vae, latent, group, tile_size=4, tile_overlap=1), ref)


def test_encode_refuses_a_split_stream():
    from renderer.vae import StreamState
    from renderer.vae.parallel_decode import HaloSplit

    vae = _vae("2.1")
    video = torch.zeros(1, 3, 1, 16, 16)  # [B, 3, F, H, W]
    with pytest.raises(NotImplementedError, match="can only decode"):
        vae.encoder(video, StreamState(split=HaloSplit(0, [2], 3)))


def test_decode_benchmark_one_and_two_ranks(tmp_path):
    """benchmarks.vae_decode (the GPU timing of this decode) on CPU: one process, then 2 gloo ranks with --check."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from benchmarks.vae_decode import main

    root = Path(__file__).resolve().parents[1]
    common = ["--tiny", "--version", "2.2", "--size", "64*48", "--frames", "5", "--device", "cpu", "--repeat", "1"]
    one = main([*common, "--out", str(tmp_path / "one.json")])
    assert one["gpus"] == 1 and one["method"] == "one process, untiled" and one["video_shape"] == [1, 3, 5, 48, 64]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          "-m", "benchmarks.vae_decode", *common, "--check", "--out", str(tmp_path / "two.json")],
                         env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["gpus"] == 2 and two["method"].startswith("halo-exchange") and len(two["seconds"]) == 1
    assert two["max_abs_err_vs_one_process"] <= TOL and two["video_shape"] == one["video_shape"]
    assert two["provenance"]["digest"] and two["code_version"].startswith("0.1.0+")
