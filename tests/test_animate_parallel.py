"""The Animate DiT under Ulysses / ring / CFG parallel and FSDP (gloo, 2 and 4 ranks) equals one process.

A two-clip animate shot and a one-clip replace shot with guidance 2 (so the uncond branch with the blank face runs,
and CFG parallel has two different branches) through the whole clip loop; the final latent of every clip must equal
the single-process one within 1e-5 (max|Δ| / max|ref|, fp32) on every rank. The latent grid 3×6×10 has 45 tokens
in 3 frames of 15: neither 2 nor 4 ranks divide it (padding), and rank slices cut frames in the middle — the case
where the official face blocks crash (Wan2.2 #178) or group the wrong tokens.
"""
from __future__ import annotations

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from renderer.families.animate.conditioning import AnimateSettings, render_animate
from renderer.parallel import ParallelConfig, init_group
from renderer.denoise import denoise
from renderer.parallel.parallelize import is_sharded
from tests.animate_helpers import tiny_animate_inputs, tiny_animate_parts

TOL = 1e-5
# (layout, modes): the replace shot runs on the first layout of each world only (process time on 2 shared cores)
LAYOUTS = {
    2: [(dict(ulysses=2), ("animate", "replace")), (dict(ring=2), ("animate",)),
        (dict(cfg=2, fsdp=True), ("animate",))],
    4: [(dict(ulysses=4), ("animate", "replace")), (dict(cfg=2, ulysses=2), ("animate",)),
        (dict(ulysses=2, ring=2, fsdp=True), ("animate",))],
}
SHOTS = {"animate": 9, "replace": 5}  # mode -> frames (9 -> 2 clips of 5 with refert 1)
HW = (48, 80)  # latent 6×10, 3 latent frames per clip -> 45 tokens


def _render(mode: str, group=None, layout=None):
    """(final latents of every clip, video) of the tiny shot, parallelised over `group` when given."""
    model, vae, clip, _ = tiny_animate_parts()
    if group is not None:
        model = group.parallelize_experts([model])[0]
        assert is_sharded(model) == layout.get("fsdp", False)
    latents = []

    def capture(*a, **k):
        out = denoise(*a, **k)
        latents.append(out)
        return out

    s = AnimateSettings(clip_len=5, refert_num=1, steps=2, guidance=2.0)
    torch.manual_seed(0)
    text, null = torch.randn(1, 5, 32), torch.randn(1, 3, 32)
    video = render_animate(model, vae, clip, tiny_animate_inputs(mode, SHOTS[mode], HW), text, null, s,
                           torch.Generator().manual_seed(3), group=group, denoise_fn=capture)
    return latents, video


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_path: str) -> None:
    torch.set_num_threads(1)
    base = init_group(ParallelConfig(ulysses=world), "gloo", rank=rank, world_size=world,
                      master_addr="127.0.0.1", master_port=port)
    results = {}
    for lay, modes in LAYOUTS[world]:
        g = init_group(ParallelConfig(**lay), "gloo", rank=rank, world_size=world)
        for mode in modes:
            latents, _ = _render(mode, g, lay)
            spread = 0.0
            for lat in latents:
                every = [torch.empty_like(lat) for _ in range(world)]
                dist.all_gather(every, lat)
                spread = max(spread, max((e - lat).abs().max().item() for e in every))
            results[f"{mode}:{lay}"] = (torch.stack(latents), spread)
    if rank == 0:
        torch.save(results, out_path)
    base.close()


def _check(world: int, tmp_path) -> None:
    out = tmp_path / f"animate_w{world}.pt"
    mp.spawn(_worker, args=(world, _free_port(), str(out)), nprocs=world, join=True)
    results = torch.load(out, weights_only=True)
    refs = {mode: torch.stack(_render(mode)[0]) for mode in SHOTS}
    bad = []
    for lay, modes in LAYOUTS[world]:
        for mode in modes:
            got, spread = results[f"{mode}:{lay}"]
            ref = refs[mode]
            err = ((got - ref).abs().max() / ref.abs().max()).item()
            if not (err <= TOL and spread == 0.0):
                bad.append(f"{mode} {lay}: rel err {err:.2e}, rank spread {spread:.2e}")
    assert not bad, "\n".join(bad)
    assert refs["animate"].shape[0] == 2  # two clips really ran


def test_two_ranks(tmp_path):
    _check(2, tmp_path)


def test_four_ranks(tmp_path):
    _check(4, tmp_path)
