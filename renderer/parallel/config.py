"""How a render group is laid out: `ParallelConfig` and the device mesh built from it.

A render group of N GPUs runs one shot. Three kinds of parallelism multiply to N:

  cfg      1 or 2. With 2, the conditional and the unconditional pass of classifier-free guidance run at the same
           time on the two halves of the group; the halves exchange one velocity per step.
  ring     ring attention degree: the sequence is cut into `ring` blocks; k/v blocks travel around the ring while
           each rank merges partial attention results (online softmax).
  ulysses  Ulysses degree: an all-to-all turns "my tokens, all heads" into "all tokens of my ring block, my heads".
           Must divide the number of attention heads.

Guidance 1 (no CFG).  A shot whose guider runs one pass per step (the `draft` tier, Wan2.2-Animate, any shot with
guidance 1.0) leaves the uncond half of a cfg=2 group idle (2× H200, draft A14B 720p: 48.1 s as cfg2, 26.5 s as
ulysses2).  `effective_layout` folds the cfg dim into sequence parallelism for such shots: cfg=2 × ulysses=u ×
ring=r becomes ulysses=2u when 2u divides the heads, else ring=2r — same GPUs, same mesh order (the cfg dim was
outermost, so the folded dim is the outer half of the new one).  `parallel.fold_idle_cfg=false` keeps the
configured layout.  Every place that lays out a group for a shot asks it: the CLI under torchrun, the farm's
render groups (jobs/group.py: both meshes built once at start, the layout switched per shot) and the scaling
harness's `auto` rows.

ring × ulysses ranks share one shot's tokens (sequence parallel, `sp` below); each rank holds
L / (ring·ulysses) tokens between the attention layers.  FSDP (fully_shard, ZeRO-3 style) shards every expert's
parameters over the whole group on top of that; it changes memory, not the result.

Mesh layout.  The mesh has dims ("cfg", "ring", "ulysses"), row-major, so

    global rank = c·(ring·ulysses) + r·ulysses + u,        sp index = r·ulysses + u

Ulysses is the innermost dim because its all-to-all runs twice per layer and is latency-bound: adjacent ranks
share the fastest links (one NVSwitch, one PCIe switch, one node).  Ring traffic is point-to-point and overlaps
the chunk attention, so it tolerates slower links; cfg exchanges one latent-sized tensor per step and is
outermost (it could even cross nodes).  Example, 8 ranks, cfg=2 × ring=2 × ulysses=2:

    rank | cfg (pass)  | ring | ulysses | sp index | tokens held (L padded to 4·n, n = ceil(L/4))
    -----+-------------+------+---------+----------+--------------------------------------------
      0  | 0 (cond)    |  0   |    0    |    0     | [0, n)
      1  | 0 (cond)    |  0   |    1    |    1     | [n, 2n)
      2  | 0 (cond)    |  1   |    0    |    2     | [2n, 3n)
      3  | 0 (cond)    |  1   |    1    |    3     | [3n, 4n)
      4  | 1 (uncond)  |  0   |    0    |    0     | [0, n)
      5  | 1 (uncond)  |  0   |    1    |    1     | [n, 2n)
      6  | 1 (uncond)  |  1   |    0    |    2     | [2n, 3n)
      7  | 1 (uncond)  |  1   |    1    |    3     | [3n, 4n)

Ulysses groups are {0,1} {2,3} {4,5} {6,7}; ring groups {0,2} {1,3} {4,6} {5,7}; cfg groups {0,4} {1,5} {2,6} {3,7}.
After the all-to-all, ranks 0 and 1 both hold ring block 0 = tokens [0, 2n), rank 0 heads [0, Hn/2), rank 1 the rest.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping

import torch

MESH_DIMS = ("cfg", "ring", "ulysses")
ULYSSES_IMPLS = ("own", "deepspeed")

# fsdp="auto": shard when the resident experts would take more than this share of one GPU's memory; the rest is
# left for activations (a 720p A14B forward peaks ~30 GB above its weights in bf16)
AUTO_FSDP_WEIGHT_SHARE = 0.5


def _or_list(values: list[int]) -> str:
    """[1, 2, 4] -> '1, 2 or 4'."""
    s = [str(v) for v in values]
    return s[0] if len(s) == 1 else ", ".join(s[:-1]) + " or " + s[-1]


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class ParallelConfig:
    """The `parallel` config group (conf/parallel/*.yaml has exactly these fields).

    cfg × ulysses × ring must equal the render group's GPU count; `validate` checks that and the head count.
    fsdp: True, False or "auto" (see `resolve_fsdp`).  ulysses_impl: "own" (renderer/parallel/attention.py) or
    "deepspeed" (DeepSpeed's DistributedAttention, for comparison; needs `pip install deepspeed`).
    fold_idle_cfg: with cfg=2, a shot without classifier-free guidance (one forward per step) runs on the layout
    `effective_layout` returns — cfg folded into ulysses (ulysses×2 when that divides the heads) or else ring —
    instead of leaving half of the group idle; False keeps cfg=2 for every shot (e.g. to measure it).
    """

    cfg: int = 1
    ulysses: int = 1
    ring: int = 1
    fsdp: bool | str = "auto"
    ulysses_impl: str = "own"
    fold_idle_cfg: bool = True

    def __post_init__(self) -> None:
        # checks that need no knowledge of the group or the model: fail at config load, not after model load
        if isinstance(self.cfg, bool) or self.cfg not in (1, 2):
            raise ValueError(f"parallel.cfg={self.cfg!r} is not allowed: cfg must be 1 (cond and uncond one after "
                             "the other) or 2 (cond and uncond on the two halves of the group)")
        for name in ("ulysses", "ring"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"parallel.{name}={v!r} must be a positive integer")
        if self.fsdp not in (True, False, "auto") or (isinstance(self.fsdp, int) and not isinstance(self.fsdp, bool)):
            raise ValueError(f"parallel.fsdp must be true, false or 'auto', got {self.fsdp!r}")
        if self.ulysses_impl not in ULYSSES_IMPLS:
            raise ValueError(f"parallel.ulysses_impl must be 'own' or 'deepspeed', got {self.ulysses_impl!r}")
        if not isinstance(self.fold_idle_cfg, bool):
            raise ValueError(f"parallel.fold_idle_cfg must be true or false, got {self.fold_idle_cfg!r}")

    # -- derived sizes -------------------------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.cfg * self.ulysses * self.ring

    @property
    def sp(self) -> int:
        """Sequence-parallel degree: ranks that share one pass's tokens."""
        return self.ulysses * self.ring

    @property
    def mesh_shape(self) -> tuple[int, int, int]:
        return (self.cfg, self.ring, self.ulysses)

    def coords(self, rank: int) -> dict[str, int]:
        """Global rank -> {"cfg": c, "ring": r, "ulysses": u} (the layout in the module docstring)."""
        c, rest = divmod(rank, self.sp)
        r, u = divmod(rest, self.ulysses)
        return {"cfg": c, "ring": r, "ulysses": u}

    # -- validation ----------------------------------------------------------------------------------------------
    def validate(self, world_size: int | None = None, num_heads: int | None = None) -> "ParallelConfig":
        """Check the layout against the group size and the model; raises ValueError with the fix in the message."""
        if world_size is not None and self.world_size != world_size:
            raise ValueError(f"cfg × ulysses × ring = {self.cfg} × {self.ulysses} × {self.ring} = "
                             f"{self.world_size} but the render group has {world_size} GPU{'s' if world_size != 1 else ''}")
        if num_heads is not None and num_heads % self.ulysses:
            raise ValueError(f"parallel.ulysses={self.ulysses} does not divide the model's {num_heads} heads: "
                             f"choose {_or_list(divisors(num_heads))}")
        return self

    def resolve_fsdp(self, expert_bytes: int, device: torch.device | str) -> bool:
        """fsdp="auto" -> shard only on CUDA groups of >1 GPU where the resident experts (all of them: switching
        experts must not reload) would take more than AUTO_FSDP_WEIGHT_SHARE of one GPU's memory.
        A14B in bf16 (2 × 28.6 GB): sharded on an 80 GB H100, not on a 141 GB H200."""
        if self.fsdp != "auto":
            return bool(self.fsdp)
        dev = torch.device(device)
        if self.world_size == 1 or dev.type != "cuda":
            return False
        total = torch.cuda.get_device_properties(dev).total_memory
        return expert_bytes > AUTO_FSDP_WEIGHT_SHARE * total

    # -- I/O -----------------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ParallelConfig":
        """From the `parallel` config group (a dict or an OmegaConf node); unknown keys are an error."""
        d = dict(d)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown parallel setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: "
                             f"valid keys are {', '.join(f.name for f in fields(cls))}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def short_name(self) -> str:
        """'cfg2_ulysses2', 'ulysses4_ring2', 'single': the conf/parallel naming, for row labels and log lines."""
        parts = [f"{d}{v}" for d, v in (("cfg", self.cfg), ("ulysses", self.ulysses), ("ring", self.ring)) if v > 1]
        return "_".join(parts) or "single"

    def describe(self) -> str:
        """'cfg2×ulysses2×ring1 (4 GPUs, fsdp auto)' for logs and sidecars."""
        return (f"cfg{self.cfg}×ulysses{self.ulysses}×ring{self.ring} ({self.world_size} GPU"
                f"{'s' if self.world_size != 1 else ''}, fsdp {self.fsdp}, ulysses_impl {self.ulysses_impl})")


def cfg_active(guidance: float | tuple[float, float] | list[float]) -> bool:
    """Does the shot's guider run two passes (cond and uncond) per step?  `guidance`: the resolved scale, or one
    per expert (low-noise, high-noise) — after the quality tier is applied.  At exactly 1.0 the uncond pass
    cancels (v_u + 1·(v_c − v_u) = v_c), so the guiders skip it (renderer/guidance.py); any expert whose scale
    differs from 1 needs it for its steps, and the layout is chosen for the whole shot."""
    scales = [guidance] if isinstance(guidance, (int, float)) else list(guidance)
    if not scales or any(isinstance(g, bool) or not isinstance(g, (int, float)) for g in scales):
        raise ValueError(f"guidance {guidance!r} is not a number: give one scale (guidance=5.0) or one per expert "
                         f"(guidance=[3.0,4.0])")
    return any(float(g) != 1.0 for g in scales)


def effective_layout(pcfg: ParallelConfig, cfg_active: bool, num_heads: int) -> ParallelConfig:
    """The layout a shot runs on: `pcfg` unless CFG is inactive (one forward per step) and pcfg.cfg == 2, in which
    case the cfg dim is folded into sequence parallelism on the same GPUs: ulysses×2 when that divides
    `num_heads` (Ulysses moves heads, and its all-to-all is the cheaper collective on one node), else ring×2
    (ring attention has no head constraint).  cfg=2 × ulysses=2 -> ulysses=4; cfg=2 × ulysses=4 with 12 heads ->
    ulysses=4 × ring=2.  Unchanged when CFG is active, cfg == 1 or pcfg.fold_idle_cfg is False.

    Pure: the same inputs give the same layout on every rank, so every rank of a group can ask it on its own.
    Raises ValueError (the `validate` messages) when `pcfg` does not fit `num_heads` to begin with.
    """
    if not isinstance(cfg_active, bool):
        raise ValueError(f"cfg_active must be True or False (does the shot's guider run cond and uncond each "
                         f"step?), got {cfg_active!r}")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads={num_heads!r} must be a positive integer (the model's attention head count)")
    pcfg.validate(num_heads=num_heads)
    if cfg_active or pcfg.cfg == 1 or not pcfg.fold_idle_cfg:
        return pcfg
    if num_heads % (2 * pcfg.ulysses) == 0:
        folded = replace(pcfg, cfg=1, ulysses=2 * pcfg.ulysses)
    else:
        folded = replace(pcfg, cfg=1, ring=2 * pcfg.ring)
    return folded.validate(pcfg.world_size, num_heads)


def layout_change_note(configured: ParallelConfig, effective: ParallelConfig, shot: str = "shot") -> str | None:
    """The one line printed / logged when a shot runs on another layout than the configured one (None: same)."""
    if effective == configured:
        return None
    return (f"parallel: {shot} runs without CFG (one forward per step): layout {configured.short_name()} -> "
            f"{effective.short_name()} on the same {effective.world_size} GPUs (parallel.fold_idle_cfg=false keeps "
            f"{configured.short_name()})")


def layout_record(configured: ParallelConfig, effective: ParallelConfig) -> dict[str, Any]:
    """What a sidecar / report row records about the layout: the configured one and the one the shot ran on."""
    return {"configured": configured.short_name(), "effective": effective.short_name(),
            "folded_idle_cfg": effective != configured, "effective_detail": effective.describe()}


def build_mesh(pcfg: ParallelConfig, device_type: str):
    """The ("cfg", "ring", "ulysses") DeviceMesh over the already initialised default process group.

    Every rank must call this with the same pcfg (it creates one process group per mesh dim slice).
    """
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, pcfg.mesh_shape, mesh_dim_names=MESH_DIMS)
