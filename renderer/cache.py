"""A step cache for the fast tier: skip the DiT blocks after the first when the first block's output barely moved.

Method: the first-block residual cache — "FBCache" (ParaAttention's First Block Cache; cache-dit's DBCache with
F=1 front block and no back blocks, vipshop/cache-dit). At every step the first block runs; its residual
r₁ = block₀(h) − h is compared with r₁ of the last step that ran in full:

    diff = Σ|r₁ − r₁_prev| / Σ|r₁_prev|     (summed over every rank's tokens: one all-reduce of two numbers)

diff < threshold (after `warmup` full steps, at most `max_skips` cached steps in a row): the other blocks are
skipped and their residual from the last full step is added instead, h_out = block₀(h) + R_rest; otherwise all
blocks run and R_rest = h_out − block₀(h) is stored. Or a fixed, calibrated schedule (MagCache-style, Wan2.2
PR #70: "precalibrated ... schedule"): a JSON list of the steps to compute, recorded by benchmarks.calibrate_cache
from one exact render.

Correct under sequence and CFG parallelism: the metric is all-reduced over the whole render group (Ulysses / ring
ranks hold different tokens; CFG ranks hold cond and uncond), so every rank takes the same decision and no rank
waits in a collective the others skipped; a fixed schedule agrees by construction. Cond and uncond keep separate
caches: with sequential CFG both run on one rank, told apart by their order within a step (same timestep).
Each expert gets its own StepCache (and `reset()` per shot), so the cache starts empty at the expert switch.
threshold = 0 never skips: the render equals the uncached one bit for bit (tests/test_cache.py).
"""
from __future__ import annotations

import json
import logging
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

log = logging.getLogger("wanrender.cache")


@dataclass
class _Branch:
    """What one branch (cond / uncond) remembers between steps."""

    first_residual: torch.Tensor | None = None  # r₁ of the last full step [B, L_local, D]
    rest_residual: torch.Tensor | None = None  # h_out − block₀(h) of the last full step [B, L_local, D]
    skips_in_row: int = 0
    steps_seen: int = 0


@dataclass
class CacheStats:
    computed: int = 0
    cached: int = 0
    metrics: list[tuple[int, int, float]] = field(default_factory=list)  # (branch, step, diff) per call
    decisions: list[bool] = field(default_factory=list)  # True = cached, in call order


class StepCache:
    """Installed on one expert (`install`); the model's forward is unchanged, its `run_blocks` is replaced."""

    def __init__(self, model: nn.Module, method: str = "fbcache", threshold: float = 0.0, warmup: int = 1,
                 max_skips: int = 2, schedule: list[bool] | None = None, group: dist.ProcessGroup | None = None,
                 distributed: bool | None = None):
        if method not in ("fbcache", "schedule"):
            raise ValueError(f"step cache method {method!r}: use fbcache or schedule")
        if method == "schedule" and schedule is None:
            raise ValueError("step cache method schedule needs the schedule (benchmarks.calibrate_cache writes it)")
        self.model, self.method, self.threshold = model, method, float(threshold)
        self.warmup, self.max_skips = int(warmup), int(max_skips)
        self.schedule = schedule  # per call of this expert, in call order: True = use the cache
        self.group = group
        self.distributed = dist.is_available() and dist.is_initialized() if distributed is None else distributed
        self.stats = CacheStats()
        self.siblings: list[StepCache] = [self]  # the caches of the other experts (install_step_caches)
        self.auto = False  # installed by method auto: plan_for_shot picks schedule or fbcache per shot
        self._branches: dict[int, _Branch] = {}
        self._t: float | None = None
        self._call_in_step = 0

    # -- installing -------------------------------------------------------------------------------------------
    def install(self) -> "StepCache":
        from renderer.families.wan22.model import WanDiT

        model, cache = self.model, self
        if type(model).run_blocks is not WanDiT.run_blocks:
            # a family that injects between blocks (Animate's face adapter) would lose its injections
            raise ValueError(f"step cache: {type(model).__name__} overrides run_blocks; the cache supports families "
                             f"whose blocks are a plain sequence")
        forward_fn = model.forward

        def run_blocks(self_model, tokens, e0, ctx, rope, image_ctx=None):
            return cache._run_blocks(self_model, tokens, e0, ctx, rope, image_ctx)

        def forward(*args, **kwargs):
            t = kwargs.get("t", args[1] if len(args) > 1 else None)
            cache._begin_call(float(t.flatten()[0]) if torch.is_tensor(t) else t)
            return forward_fn(*args, **kwargs)

        model.run_blocks = types.MethodType(run_blocks, model)
        model.forward = forward
        model.step_cache = self
        return self

    def reset(self) -> None:
        """A new shot: forget every branch and the call counters."""
        self._branches.clear()
        self._t, self._call_in_step = None, 0
        self.stats = CacheStats()

    # -- per call ---------------------------------------------------------------------------------------------
    def _begin_call(self, t: float | None) -> None:
        if t is not None and t == self._t:
            self._call_in_step += 1  # same timestep: the next CFG branch of this step
        else:
            self._t, self._call_in_step = t, 0

    def _global_sums(self, num: torch.Tensor, den: torch.Tensor) -> float:
        both = torch.stack([num.double(), den.double()])  # [2]
        if self.distributed:
            dist.all_reduce(both, group=self.group)  # every rank of the group gets the same two numbers
        return float(both[0] / both[1].clamp_min(1e-30))

    def _decide(self, br: _Branch, r1: torch.Tensor) -> bool:
        step = br.steps_seen  # this expert's step index (each branch counts the same steps)
        if self.method == "schedule":  # fixed: every rank reads the same list
            self.stats.metrics.append((self._call_in_step, step, float("nan")))
            return step < len(self.schedule) and bool(self.schedule[step]) and br.rest_residual is not None
        diff = float("inf")
        if br.first_residual is not None:  # the same on every rank: decisions so far were identical
            num = (r1.float() - br.first_residual.float()).abs().sum()
            den = br.first_residual.float().abs().sum()
            diff = self._global_sums(num, den)
        self.stats.metrics.append((self._call_in_step, step, diff))
        return (step >= self.warmup and br.skips_in_row < self.max_skips and br.rest_residual is not None
                and diff < self.threshold)

    def _run_blocks(self, model, tokens, e0, ctx, rope, image_ctx):
        model._prepare_fast_path(tokens, e0, ctx)  # compile / attention autotune, as the family's run_blocks does
        if not self._branches:  # this expert starts: the other expert's residuals (GBs at 720p) are dead weight
            for other in self.siblings:
                if other is not self:
                    other._branches.clear()
        br = self._branches.setdefault(self._call_in_step, _Branch())
        first, rest = model.blocks[0], model.blocks[1:]
        h1 = first(tokens, e0, ctx, rope, image_ctx)  # [B, L_local, D]
        r1 = h1 - tokens  # [B, L_local, D]
        use_cache = self._decide(br, r1)
        self.stats.decisions.append(use_cache)
        br.steps_seen += 1
        if use_cache:
            br.skips_in_row += 1
            self.stats.cached += 1
            return h1 + br.rest_residual  # [B, L_local, D]
        out = h1
        for block in rest:
            out = block(out, e0, ctx, rope, image_ctx)  # [B, L_local, D]
        # r₁ only feeds the metric: kept in the block dtype (bf16 on a GPU: 0.75 GB at 720p instead of 1.5);
        # the residual that replaces the skipped blocks stays in the fp32 of the residual stream
        br.first_residual, br.rest_residual, br.skips_in_row = r1.to(model.dtype), out - h1, 0
        self.stats.computed += 1
        return out


def install_step_caches(experts, settings, group: dist.ProcessGroup | None = None) -> list[StepCache]:
    """One StepCache per expert from a tier's CacheSettings (renderer/tiers.py); [] when method is none.
    method auto installs fbcache caches; `plan_for_shot` turns them into the published MagCache schedule per shot
    where the model has one."""
    if settings.method == "none":
        return []
    schedules: list[list[bool] | None] = [None] * len(experts)
    if settings.method == "auto":
        caches = [StepCache(m, "fbcache", settings.threshold, settings.warmup, settings.max_skips, group=group).install()
                  for m in experts]
        for c in caches:
            c.siblings = caches
            c.auto = True
        return caches
    if settings.method == "schedule":
        data = load_schedule(settings.schedule)
        schedules = [data["experts"][i] if i < len(data["experts"]) else [] for i in range(len(experts))]
    caches = [StepCache(m, settings.method, settings.threshold, settings.warmup, settings.max_skips, schedules[i],
                        group=group).install() for i, m in enumerate(experts)]
    for c in caches:
        c.siblings = caches
    return caches


def plan_for_shot(caches: list[StepCache], model: str, steps: int, shift: float, boundary: float | None,
                  image: bool) -> str | None:
    """Before a shot (after StepCache.reset): caches installed by method auto replay the published MagCache schedule
    of `model` for this shot's steps / shift / expert boundary (renderer/cache_schedules.py: decisions calibrated on
    the real weights, the same on every rank) when there is one, else stay fbcache. Returns what they do, for the
    sidecar: "magcache (published, N of S steps cached)", "fbcache", or None (no auto caches)."""
    auto = [c for c in caches if c.auto]
    if not auto:
        return None
    from renderer.cache_schedules import has_published_calibration, magcache_schedule

    if not has_published_calibration(model):
        for c in auto:
            c.method, c.schedule = "fbcache", None
        return f"fbcache (threshold {auto[0].threshold}; no published MagCache calibration for {model})"
    plan = magcache_schedule(model, steps, shift, boundary, image=image)
    if len(plan["experts"]) != len(auto):
        raise ValueError(f"step cache: the MagCache schedule of {model} has {len(plan['experts'])} expert(s), the "
                         f"pipeline {len(auto)}")
    for c, sched in zip(auto, plan["experts"]):
        c.method, c.schedule = "schedule", list(sched)
    return f"magcache (published calibration, {plan['cached_steps']} of {steps} steps cached)"


def load_schedule(path: str | Path) -> dict:
    """A calibrated schedule: {"experts": [[bool per step of expert 0], [... expert 1]], "threshold": ..., ...}."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"quality.cache.schedule: {p} does not exist: run python -m benchmarks.calibrate_cache first")
    data = json.loads(p.read_text())
    if not isinstance(data.get("experts"), list):
        raise ValueError(f"quality.cache.schedule: {p} is not a schedule written by benchmarks.calibrate_cache")
    return data


def step_metrics(stats: CacheStats) -> list[float]:
    """Per step of one expert: the largest residual change over its branches (cond, uncond)."""
    per: dict[int, float] = {}
    for _, step, diff in stats.metrics:
        per[step] = max(per.get(step, 0.0), diff)
    return [per[s] for s in sorted(per)]


def schedule_from_metrics(metrics: list[float], threshold: float, warmup: int = 1, max_skips: int = 2) -> list[bool]:
    """Calibration: which steps to serve from the cache, given each step's first-block residual change in an
    exact render. The change since the last computed step is accumulated (MagCache's accumulated error) and a
    step is cached while the sum stays under `threshold`."""
    out: list[bool] = []
    acc, skips = 0.0, 0
    for step, m in enumerate(metrics):
        use = step >= warmup and skips < max_skips and acc + m < threshold
        acc, skips = (acc + m, skips + 1) if use else (0.0, 0)
        out.append(use)
    return out
