"""Apply a `ParallelConfig` to a model expert, torchtitan style: the model stays plain, parallelism is bolted on.

Order (each step assumes the previous one):
  1. validate    heads % ulysses, group size — before anything is changed;
  2. sequence    set `model.token_split` (a SequenceSharder on the mesh's ring/ulysses slices; the model splits and
                 gathers the tensors its `sp_plan` names) and fill the `attn_fn` slots the plan names with one
                 shared SequenceParallelAttention (or DeepSpeed's Ulysses);
  3. fsdp        freeze the parameters, `fully_shard` every block, then the root (embeddings, head) — over the whole
                 group (a 1-D mesh of all ranks), reshard after forward (ZeRO-3, as the official FULL_SHARD).
Step 2 only sets attributes, so it must come before FSDP wraps the modules; casting to the render dtype
(`model.set_dtype`) and loading weights must happen before step 3, because FSDP owns the parameters afterwards.

CFG parallel needs nothing here: each half of the group runs the same parallelised model on its own prompt
(renderer/guidance.py, ParallelCFG).
"""
from __future__ import annotations

from fnmatch import fnmatch

import torch
import torch.nn as nn

from renderer.parallel.attention import DeepSpeedUlyssesAttention, SequenceParallelAttention
from renderer.parallel.config import ParallelConfig
from renderer.parallel.sequence import SequenceSharder


def make_sharder(mesh) -> SequenceSharder:
    """The sharder for this rank's slices of the ("cfg", "ring", "ulysses") mesh."""
    uly, ring = mesh["ulysses"], mesh["ring"]
    return SequenceSharder(uly.get_group() if uly.size() > 1 else None, uly.size(), uly.get_local_rank(),
                           ring.get_group() if ring.size() > 1 else None, ring.size(), ring.get_local_rank())


def apply_sequence_parallel(model: nn.Module, mesh, pcfg: ParallelConfig, agree=None) -> SequenceSharder | None:
    """Step 2. Returns the sharder (None when sp = 1: the model is left untouched). The attention backend is the
    model's KernelSettings (`model.kernels`, set by the pipeline before parallelizing); agree: RenderGroup.agree."""
    if pcfg.sp == 1:
        return None
    sharder = make_sharder(mesh)
    cls = DeepSpeedUlyssesAttention if pcfg.ulysses_impl == "deepspeed" else SequenceParallelAttention
    kernels = model.kernels
    # one object for all blocks: they share the sharder's seq_len
    attn = cls(sharder, kernels.attention, kernels.allow_lossy, agree)
    model.token_split = sharder
    # The collectives stay outside torch.compile's graphs: a compiled block breaks its graph around this call
    # and fuses everything else (norms, RoPE, modulation, FFN), so sequence-parallel ranks compile like one GPU.
    attn_fn = torch.compiler.disable(attn)
    plan = model.sp_plan  # the model declares its attention slots and token split (renderer/families/spec.py)
    slots = [m for name, m in model.named_modules() if any(fnmatch(name, p) for p in plan.attention)]
    if not slots:
        raise ValueError(f"{type(model).__name__}.sp_plan names no module: attention={plan.attention}")
    for module in slots:
        module.attn_fn = attn_fn
    return sharder


def _attention_slots(model: nn.Module) -> list[nn.Module]:
    plan = model.sp_plan
    return [m for name, m in model.named_modules() if any(fnmatch(name, p) for p in plan.attention)]


def reapply_sequence_parallel(model: nn.Module, mesh, old: ParallelConfig, new: ParallelConfig,
                              agree=None) -> SequenceSharder | None:
    """Lay an already parallelised expert out anew (RenderGroup.use_layout): from `old` to `new` on `mesh`.
    Weights and FSDP shards are not touched (FSDP spans the whole group in every layout); only the token split
    and the attention slots change. Each layout's pair is kept on the model and put back when the layout comes
    back, so compiled blocks find the attn_fn object their graphs were traced with (a new object per switch
    would recompile on every switch and soon hit dynamo's recompile limit)."""
    pcfg_world = mesh.size() if mesh is not None else 1
    new.validate(pcfg_world, model.cfg.num_heads)
    slots = _attention_slots(model)
    kept = getattr(model, "_sp_layouts", None)
    if kept is None:
        kept = {}
        model._sp_layouts = kept
    kept[(old.mesh_shape, old.ulysses_impl)] = (model.token_split, slots[0].attn_fn if slots else None)
    key = (new.mesh_shape, new.ulysses_impl)
    if key in kept:
        sharder, attn_fn = kept[key]
        model.token_split = sharder
        for module in slots:
            module.attn_fn = attn_fn
        return sharder
    model.token_split = None
    for module in slots:
        module.attn_fn = None  # the model's own attention
    sharder = apply_sequence_parallel(model, mesh, new, agree) if mesh is not None else None
    kept[key] = (model.token_split, slots[0].attn_fn if slots else None)
    return sharder


def apply_fsdp(model: nn.Module, fsdp_mesh) -> nn.Module:
    """Step 3. Shard every block, then the root, over `fsdp_mesh` (1-D, all ranks of the group).

    The parameters are frozen first: rendering never needs gradients, and FSDP2 only insists on one parameter
    dtype per group for trainable parameters — the DiT keeps modulation / time embedding / norm3 in fp32 beside
    bf16 weights, which FSDP2 then all-gathers as bytes.
    """
    from torch.distributed.fsdp import fully_shard

    model.requires_grad_(False)
    for block in model.blocks:
        fully_shard(block, mesh=fsdp_mesh, reshard_after_forward=True)
    fully_shard(model, mesh=fsdp_mesh, reshard_after_forward=True)
    return model


def expert_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def parallelize(model: nn.Module, mesh, pcfg: ParallelConfig, *, fsdp_mesh=None, fsdp: bool | None = None,
                agree=None) -> nn.Module:
    """Apply steps 1–3 to one expert in place and return it.

    mesh: the ("cfg", "ring", "ulysses") DeviceMesh (None for a single GPU); fsdp_mesh: 1-D mesh of the whole
    group, needed when FSDP is on; fsdp: overrides pcfg.fsdp once resolved (the caller resolves "auto" over all
    experts together — see `RenderGroup.parallelize_experts`); agree: RenderGroup.agree.
    """
    world = mesh.size() if mesh is not None else 1
    pcfg.validate(world, model.cfg.num_heads)
    if mesh is not None:
        model.kernel_agree = agree  # "auto" attention: every rank runs rank 0's choice
        apply_sequence_parallel(model, mesh, pcfg, agree)
    if fsdp is None:
        fsdp = pcfg.resolve_fsdp(expert_bytes(model), next(model.parameters()).device)
    if fsdp and world > 1:
        if fsdp_mesh is None:
            raise ValueError("FSDP is on but no fsdp_mesh was given: pass RenderGroup.fsdp_mesh")
        apply_fsdp(model, fsdp_mesh)
    return model


def is_sharded(model: nn.Module) -> bool:
    """True once `apply_fsdp` has run on the model."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


__all__ = ["parallelize", "apply_sequence_parallel", "reapply_sequence_parallel", "apply_fsdp", "make_sharder", "expert_bytes", "is_sharded"]
