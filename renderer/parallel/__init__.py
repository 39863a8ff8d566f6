"""Multi-GPU shots: CFG parallel × ring × Ulysses sequence parallel, FSDP on top.

Use from a pipeline (every rank runs the same code):

    group = init_group(ParallelConfig.from_dict(cfg.parallel))       # torchrun env, or rank=/world_size=/master_*
    experts = group.parallelize_experts(experts)                     # after weights are loaded and cast
    latent = renderer.denoise.denoise(experts, conditioner, sampler, noise, guider=make_guider(group), ...)

Modules: config (ParallelConfig, mesh layout table), sequence (token split/gather), attention (Ulysses, ring,
DeepSpeed adapter), parallelize (the order things are applied in, driven by the model's sp_plan), group
(runtime), launch (`python -m renderer.parallel.launch`, a torchrun smoke test and timer), selftest (tiny shots).
The denoising loop itself is renderer/denoise.py, the same for one GPU and a group.
"""
from renderer.parallel.config import MESH_DIMS, ParallelConfig, build_mesh, cfg_active, effective_layout
from renderer.parallel.group import RenderGroup, init_group
from renderer.parallel.parallelize import apply_fsdp, apply_sequence_parallel, parallelize
from renderer.parallel.sequence import SequenceSharder

__all__ = ["MESH_DIMS", "ParallelConfig", "build_mesh", "cfg_active", "effective_layout", "RenderGroup",
           "init_group", "apply_fsdp", "apply_sequence_parallel", "parallelize", "SequenceSharder"]
