"""How a render group is laid out: `ParallelConfig` and the device mesh built from it.

A render group of N GPUs runs one shot. Three kinds of parallelism multiply to N:

  cfg      1 or 2. With 2, the conditional and the unconditional pass of classifier-free guidance run at the same
           time on the two halves of the group; the halves exchange one velocity per step.
  ring     ring attention degree: the sequence is cut into `ring` blocks; k/v blocks travel around the ring while
           each rank merges partial attention results (online softmax).
  ulysses  Ulysses degree: an all-to-all turns "my tokens, all heads" into "all tokens of my ring block, my heads".
           Must divide the number of attention heads.

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

from dataclasses import asdict, dataclass, fields
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
    """

    cfg: int = 1
    ulysses: int = 1
    ring: int = 1
    fsdp: bool | str = "auto"
    ulysses_impl: str = "own"

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

    def describe(self) -> str:
        """'cfg2×ulysses2×ring1 (4 GPUs, fsdp auto)' for logs and sidecars."""
        return (f"cfg{self.cfg}×ulysses{self.ulysses}×ring{self.ring} ({self.world_size} GPU"
                f"{'s' if self.world_size != 1 else ''}, fsdp {self.fsdp}, ulysses_impl {self.ulysses_impl})")


def build_mesh(pcfg: ParallelConfig, device_type: str):
    """The ("cfg", "ring", "ulysses") DeviceMesh over the already initialised default process group.

    Every rank must call this with the same pcfg (it creates one process group per mesh dim slice).
    """
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, pcfg.mesh_shape, mesh_dim_names=MESH_DIMS)
