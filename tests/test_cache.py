"""renderer/cache.py: the first-block residual step cache. Threshold 0 equals the uncached render bit for bit; a
positive threshold skips steps; cond/uncond caches are separate; every rank of a gloo group (Ulysses 2, CFG 2)
takes the same decisions and ends on the same latent."""
from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from renderer.cache import StepCache, install_step_caches, schedule_from_metrics, step_metrics
from renderer.parallel import ParallelConfig, init_group
from renderer.parallel.selftest import run_shot, tiny_shot
from renderer.tiers import CacheSettings

STEPS = 8
HIGH = 0.8  # skips some of the 8 steps of the tiny model (random weights: its first-block residual moves ~0.65 a step)


def _cached_run(threshold: float, group=None, method="fbcache", schedule=None):
    shot = tiny_shot("t2v", steps=STEPS)
    experts = shot.experts()
    if group is not None and group.distributed:
        experts = group.parallelize_experts(experts)
    caches = [StepCache(m, method, threshold, warmup=1, max_skips=2,
                        schedule=None if schedule is None else schedule[i]).install() for i, m in enumerate(experts)]
    for c in caches:
        c.siblings = caches
    return run_shot(shot, group, experts=experts), caches


def test_threshold_zero_equals_uncached_bit_for_bit():
    ref = run_shot(tiny_shot("t2v", steps=STEPS))
    latent, caches = _cached_run(0.0)
    assert torch.equal(latent, ref)
    assert sum(c.stats.cached for c in caches) == 0
    # sequential CFG: cond and uncond have their own cache entries; the high-noise expert's were dropped when the
    # low-noise expert started (reset at the switch: its residuals are gigabytes at 720p)
    assert caches[0]._branches == {} and set(caches[1]._branches) == {0, 1}


def test_positive_threshold_skips_and_stays_close():
    ref = run_shot(tiny_shot("t2v", steps=STEPS))
    latent, caches = _cached_run(HIGH)
    cached = sum(c.stats.cached for c in caches)
    assert cached > 0
    err = ((latent - ref).abs().max() / ref.abs().max()).item()
    assert 0 < err < 0.2, err  # skipped blocks change the result, but it stays the same render
    for c in caches:
        # the cache starts empty on each expert (reset at the switch): its first step of each branch is computed
        firsts = [d for (b, s, _), d in zip(c.stats.metrics, c.stats.decisions) if s == 0]
        assert firsts and not any(firsts)


def test_calibrated_schedule_round_trip():
    """benchmarks.calibrate_cache's core: metrics of an exact render -> a schedule that the cache replays."""
    _, caches = _cached_run(0.0)
    metrics = [step_metrics(c.stats) for c in caches]
    assert all(m[0] == float("inf") for m in metrics)  # nothing to compare with at an expert's first step
    schedule = [schedule_from_metrics(m, threshold=2 * HIGH, warmup=1, max_skips=2) for m in metrics]
    assert any(any(s) for s in schedule)
    _, replay = _cached_run(0.0, method="schedule", schedule=schedule)
    for c, sched in zip(replay, schedule):
        per_step = {}
        for (branch, step, _), d in zip(c.stats.metrics, c.stats.decisions):
            per_step.setdefault(step, set()).add(d)
        assert [per_step[s] == {sched[s]} for s in sorted(per_step)] == [True] * len(per_step)


def test_install_from_tier_settings_and_errors():
    shot = tiny_shot("t2v", steps=2)
    assert install_step_caches(shot.experts(), CacheSettings()) == []
    caches = install_step_caches(shot.experts(), CacheSettings(method="fbcache", threshold=0.1))
    assert len(caches) == 2 and all(c.threshold == 0.1 for c in caches)
    with pytest.raises(ValueError, match="needs the schedule"):
        StepCache(shot.experts()[0], "schedule")
    with pytest.raises(ValueError, match="does not exist: run python -m benchmarks.calibrate_cache"):
        install_step_caches(shot.experts(), CacheSettings(method="schedule", schedule="/nonexistent.json"))


# -- two ranks ------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_path: str) -> None:
    torch.set_num_threads(1)
    base = init_group(ParallelConfig(ulysses=world), "gloo", rank=rank, world_size=world, master_addr="127.0.0.1",
                      master_port=port)
    results = {}
    for name, lay in (("ulysses2", dict(ulysses=2)), ("cfg2", dict(cfg=2))):
        g = init_group(ParallelConfig(**lay), "gloo", rank=rank, world_size=world)
        for threshold in (0.0, HIGH):
            latent, caches = _cached_run(threshold, g)
            decisions = torch.tensor([d for c in caches for d in c.stats.decisions], dtype=torch.int64)
            every_d = [torch.empty_like(decisions) for _ in range(world)]
            dist.all_gather(every_d, decisions)
            every = [torch.empty_like(latent) for _ in range(world)]
            dist.all_gather(every, latent)
            results[f"{name}@{threshold}"] = {
                "latent": latent,
                "spread": max((e - latent).abs().max().item() for e in every),
                "decisions_agree": all(torch.equal(d, decisions) for d in every_d),
                "cached": sum(c.stats.cached for c in caches),
            }
    if rank == 0:
        torch.save(results, out_path)
    base.close()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "w2.pt"
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("layout", ["ulysses2", "cfg2"])
def test_two_ranks_agree_and_threshold_zero_matches_uncached(two_ranks, layout):
    ref = run_shot(tiny_shot("t2v", steps=STEPS))
    exact = two_ranks[f"{layout}@0.0"]
    err = ((exact["latent"] - ref).abs().max() / ref.abs().max()).item()
    assert err <= 1e-5 and exact["cached"] == 0  # the parallel parity tolerance: no step skipped
    cached = two_ranks[f"{layout}@{HIGH}"]
    assert cached["cached"] > 0
    for r in (exact, cached):
        assert r["decisions_agree"] and r["spread"] == 0.0
