"""The render group runtime: one process per GPU, a process group, the device mesh.

Two launchers start the processes:
  * torchrun (`torchrun --nproc-per-node N -m renderer.parallel.launch ...`): RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR and MASTER_PORT come from the environment — call `init_group(pcfg)`;
  * the Ray farm: the driver picks a master address/port and starts N actors, each calling
    `init_group(pcfg, rank=i, world_size=N, master_addr=..., master_port=..., local_rank=...)`.
Without either (one plain process) the group is a single GPU with no process group at all.

The backend is NCCL when CUDA is available, gloo otherwise (CPU tests); `backend=` overrides.

One group, several layouts.  A group renders shot after shot, and a shot without CFG runs on a different layout
than the configured cfg=2 one (config.effective_layout).  `prepare_layouts` builds the other layouts' meshes once,
up front (their process groups; NCCL creates each communicator on its first collective and keeps it), and
`use_layout` switches the group and its parallelised experts between them per shot — the weights, FSDP shards
and communicators stay; only the experts' sequence-parallel attributes are set anew.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Sequence

import torch
import torch.distributed as dist

from renderer.parallel.config import ParallelConfig, build_mesh


@dataclass
class RenderGroup:
    """What a rank knows about its group. `mesh` and `fsdp_mesh` are None for a single process."""

    pcfg: ParallelConfig
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    mesh: Any = None  # DeviceMesh ("cfg", "ring", "ulysses")
    fsdp_mesh: Any = None  # 1-D DeviceMesh of all ranks, built when FSDP is first used
    owns_process_group: bool = False  # init_group created it, so close() destroys it
    configured: ParallelConfig | None = None  # the layout the group was started with (pcfg: the current one)
    meshes: dict = field(default_factory=dict)  # mesh_shape -> DeviceMesh, every layout prepared so far

    def __post_init__(self) -> None:
        if self.configured is None:
            self.configured = self.pcfg
        if self.mesh is not None:
            self.meshes.setdefault(self.pcfg.mesh_shape, self.mesh)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the outputs and the logs."""
        return self.rank == 0

    @property
    def coords(self) -> dict[str, int]:
        return self.pcfg.coords(self.rank)

    @property
    def cfg_rank(self) -> int:
        """0: this rank runs the conditional pass; 1: the unconditional one (cfg=2 only)."""
        return self.coords["cfg"]

    def cfg_group(self):
        return self.mesh["cfg"].get_group()

    def get_fsdp_mesh(self):
        if self.fsdp_mesh is None and self.distributed:
            from torch.distributed.device_mesh import init_device_mesh

            self.fsdp_mesh = init_device_mesh(self.device.type, (self.world_size,), mesh_dim_names=("fsdp",))
        return self.fsdp_mesh

    def parallelize_experts(self, experts: Sequence[torch.nn.Module]) -> list[torch.nn.Module]:
        """`parallelize` every expert (the A14B pair or the single 5B model); their KernelSettings must be applied
        (model.use_kernels) before.

        fsdp="auto" is decided once for all experts together, because both A14B experts stay resident.
        """
        from renderer.parallel.parallelize import expert_bytes, parallelize

        fsdp = self.pcfg.resolve_fsdp(sum(expert_bytes(m) for m in experts), self.device)
        fsdp_mesh = self.get_fsdp_mesh() if fsdp else None
        return [parallelize(m, self.mesh, self.pcfg, fsdp_mesh=fsdp_mesh, fsdp=fsdp, agree=self.agree)
                for m in experts]

    def mesh_for(self, pcfg: ParallelConfig):
        """The DeviceMesh of `pcfg` over this group, built on first use (a collective: every rank asks for the same
        layouts in the same order)."""
        if not self.distributed:
            return None
        pcfg.validate(self.world_size)
        if pcfg.mesh_shape not in self.meshes:
            self.meshes[pcfg.mesh_shape] = build_mesh(pcfg, self.device.type)
        return self.meshes[pcfg.mesh_shape]

    def prepare_layouts(self, *layouts: ParallelConfig) -> None:
        """Build the meshes of `layouts` now (at group start), so no shot waits for process groups to form."""
        for pcfg in layouts:
            self.mesh_for(pcfg)

    def use_layout(self, pcfg: ParallelConfig, experts: Sequence[torch.nn.Module] = ()) -> bool:
        """Switch the group to `pcfg` (same GPUs, same fsdp and ulysses_impl) and re-apply sequence parallelism to
        the already parallelised `experts`. Every rank calls it with the same pcfg before the same shot. Returns
        whether anything changed. The guider reads `pcfg.cfg` per shot (renderer/guidance.make_guider)."""
        if pcfg == self.pcfg:
            return False
        if (pcfg.fsdp, pcfg.ulysses_impl) != (self.pcfg.fsdp, self.pcfg.ulysses_impl):
            raise ValueError(f"use_layout: {pcfg.describe()} changes fsdp or ulysses_impl of {self.pcfg.describe()};"
                             f" only cfg, ulysses and ring can change while the experts stay loaded")
        mesh = self.mesh_for(pcfg)
        if self.distributed:
            from renderer.parallel.parallelize import reapply_sequence_parallel

            for m in experts:
                reapply_sequence_parallel(m, mesh, self.pcfg, pcfg, self.agree)
        self.pcfg, self.mesh = pcfg, mesh
        return True

    def agree(self, value: str) -> str:
        """Rank 0's `value` on every rank (a collective: every rank calls it at the same point)."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_process_group = False


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else None


def init_group(pcfg: ParallelConfig | None = None, backend: str | None = None, *, rank: int | None = None,
               world_size: int | None = None, master_addr: str | None = None, master_port: int | None = None,
               local_rank: int | None = None, timeout_s: float = 1800.0) -> RenderGroup:
    """Join (or create) the render group and build its mesh. Every rank calls this with the same pcfg.

    rank/world_size/master_addr/master_port/local_rank default to the torchrun environment variables.
    pcfg defaults to Ulysses over the whole group (the official Wan2.2 layout).
    An already initialised default process group (a test harness, a Ray integration) is reused, not replaced.
    """
    rank = rank if rank is not None else _env_int("RANK") or 0
    world_size = world_size if world_size is not None else _env_int("WORLD_SIZE") or 1
    local_rank = local_rank if local_rank is not None else _env_int("LOCAL_RANK")
    if local_rank is None:
        local_rank = rank % max(torch.cuda.device_count(), 1)
    pcfg = pcfg if pcfg is not None else ParallelConfig(ulysses=world_size)
    pcfg.validate(world_size)  # before any rendezvous: a bad layout must not hang the other ranks
    backend = backend or default_backend()
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size == 1 and not dist.is_initialized():
        return RenderGroup(pcfg, device=device)

    owns = False
    if not dist.is_initialized():
        if master_addr is not None or master_port is not None:
            addr = master_addr or os.environ.get("MASTER_ADDR", "127.0.0.1")
            port = master_port or _env_int("MASTER_PORT") or 29500
            host = f"[{addr}]" if ":" in addr and not addr.startswith("[") else addr  # IPv6 literal
            init_method = f"tcp://{host}:{port}"
        else:
            init_method = "env://"
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
        owns = True
    elif dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise RuntimeError(f"a process group is already initialised as rank {dist.get_rank()} of "
                           f"{dist.get_world_size()}, not rank {rank} of {world_size}")
    mesh = build_mesh(pcfg, device.type)
    return RenderGroup(pcfg, rank, world_size, local_rank, device, backend, mesh, None, owns, pcfg)
