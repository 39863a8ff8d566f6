"""`python -m renderer.parallel.launch`: render one random-weight shot on a render group, time it, check it.

    torchrun --nproc-per-node 4 -m renderer.parallel.launch --parallel gpus4 --check
    torchrun --nproc-per-node 8 -m renderer.parallel.launch --parallel ulysses8 --model t2v_a14b \
        --dtype bfloat16 --grid 21 90 160 --steps 2 --repeat 2          # a 720p A14B timing, random weights

    torchrun --nproc-per-node 2 -m renderer.parallel.launch --parallel gpus2 --guidance 1 5 1 --check
                                    # one group, the layout per shot: guidance 1 folds cfg2 into ulysses2 (NCCL)

--guidance G [G ...] renders the shot once per scale on the same group and loaded experts, each on the layout
renderer.parallel.effective_layout picks for it (RenderGroup.use_layout, as a farm group does between drafts and
finals); the JSON then has one entry per render under "renders".
--check also renders the shot on rank 0 alone (no parallelism) and reports max|Δ| / max|ref| of the final latents;
only sensible for models that fit one device. The reference runs like the group did (eager vs eager, compiled vs
compiled; `compared` in the JSON says which), so the figure is the layout's error, not compile's.  Rank 0 prints one JSON line.  Also runs without torchrun as a
single process (then the layout must be `single`).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from kernels.attention import resolved_backend
from kernels.compile import blocks_compiled
from kernels.settings import KernelSettings
from renderer.parallel.config import ParallelConfig, cfg_active, effective_layout
from renderer.parallel.group import init_group
from renderer.parallel.parallelize import is_sharded
from renderer.parallel.selftest import run_shot, tiny_shot
from renderer.provenance import code_version

PARALLEL_CONF = Path(__file__).resolve().parents[2] / "conf" / "parallel"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_parallel_preset(name: str) -> ParallelConfig:
    """conf/parallel/<name>.yaml -> ParallelConfig."""
    from omegaconf import OmegaConf

    path = PARALLEL_CONF / f"{name}.yaml"
    if not path.exists():
        names = sorted(p.stem for p in PARALLEL_CONF.glob("*.yaml"))
        raise SystemExit(f"no parallel preset {name!r}: choose one of {', '.join(names)}")
    return ParallelConfig.from_dict(OmegaConf.to_container(OmegaConf.load(path)))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m renderer.parallel.launch", description=__doc__.split("\n")[0])
    ap.add_argument("--parallel", default=None, help="preset in conf/parallel (default: ulysses over all ranks)")
    for dim in ("--cfg", "--ulysses", "--ring"):
        ap.add_argument(dim, type=int, help="override the preset's degree")
    ap.add_argument("--fsdp", choices=["true", "false", "auto"])
    ap.add_argument("--ulysses-impl", choices=["own", "deepspeed"])
    ap.add_argument("--task", default="t2v", choices=["t2v", "i2v", "ti2v"])
    ap.add_argument("--model", default=None, help="model preset in conf/model (default tiny_<task>)")
    ap.add_argument("--grid", type=int, nargs=3, default=[3, 6, 10], metavar=("F", "H", "W"), help="latent size")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--sampler", default="unipc")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--attention", default=None, help="attention backend (default: auto)")
    ap.add_argument("--repeat", type=int, default=1, help="time this many renders (the first one warms up)")
    ap.add_argument("--check", action="store_true", help="compare with a single-process render on rank 0")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                    help="kernels.compile of the group's experts; --check runs the reference the same way (eager vs "
                         "eager, compiled vs compiled)")
    ap.add_argument("--backend", default=None, help="nccl or gloo (default: nccl on CUDA)")
    ap.add_argument("--guidance", type=float, nargs="+", default=None,
                    help="render once per scale on one group, the layout chosen per render (effective_layout)")
    return ap.parse_args(argv)


def layout_from_args(args, world_size: int) -> ParallelConfig:
    base = load_parallel_preset(args.parallel).to_dict() if args.parallel else {"ulysses": world_size}
    over = {"cfg": args.cfg, "ulysses": args.ulysses, "ring": args.ring, "ulysses_impl": args.ulysses_impl,
            "fsdp": {"true": True, "false": False, "auto": "auto"}.get(args.fsdp)}
    return ParallelConfig.from_dict({**base, **{k: v for k, v in over.items() if v is not None}})


def main(argv=None) -> dict:
    args = parse_args(argv)
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    group = init_group(layout_from_args(args, world), args.backend)
    kernels = KernelSettings(attention=args.attention or "auto", compile=args.compile)
    try:
        dtype = DTYPES[args.dtype]
        shot = tiny_shot(args.task, tuple(args.grid), args.steps, args.sampler, preset=args.model)
        group.pcfg.validate(group.world_size, shot.dit.num_heads)
        experts = shot.experts(dtype, group.device, kernels)
        if args.guidance and group.distributed:  # the other layout's process groups before anything runs
            group.prepare_layouts(effective_layout(group.configured, False, shot.dit.num_heads))
        if group.distributed:
            experts = group.parallelize_experts(experts)
        if args.guidance:
            return _per_shot_layouts(args, group, shot, dtype, kernels, experts)
        seconds = []
        for _ in range(max(args.repeat, 1)):
            group.barrier()
            t0 = time.perf_counter()
            latent = run_shot(shot, group, dtype, experts=experts)
            if group.device.type == "cuda":
                torch.cuda.synchronize(group.device)
            seconds.append(time.perf_counter() - t0)
        report = {"layout": group.pcfg.describe(), "world_size": group.world_size, "backend": group.backend,
                  "device": str(group.device), "task": args.task, "model": args.model or f"tiny_{args.task}",
                  "grid": args.grid, "steps": args.steps, "dtype": args.dtype, "seconds": seconds,
                  "fsdp": any(is_sharded(m) for m in experts)}
        report["compiled"] = any(blocks_compiled(m) for m in experts)
        report["attention_backend"] = resolved_backend(kernels.attention)
        report["code_version"] = code_version()
        if group.device.type == "cuda":
            report["peak_gb"] = torch.cuda.max_memory_allocated(group.device) / 1e9
        if args.check and group.is_main:
            report.update(_check_against_one_process(shot, group, dtype, latent, kernels, report["compiled"]))
        if group.is_main:
            print(json.dumps(report, ensure_ascii=False), flush=True)
        group.barrier()
        return report
    finally:
        group.close()


def _per_shot_layouts(args, group, shot, dtype, kernels: KernelSettings, experts) -> dict:
    """One render per --guidance value on the same group, each on its effective layout; rank 0 prints the JSON."""
    renders, latents = [], []
    for g in args.guidance:
        pcfg = effective_layout(group.configured, cfg_active(g), shot.dit.num_heads)
        group.use_layout(pcfg, experts)
        group.barrier()
        t0 = time.perf_counter()
        latents.append(run_shot(shot, group, dtype, experts=experts, guidance=g))  # [1, C, F, H, W]
        if group.device.type == "cuda":
            torch.cuda.synchronize(group.device)
        renders.append({"guidance": g, "layout": group.pcfg.short_name(), "seconds": time.perf_counter() - t0})
    compiled = any(blocks_compiled(m) for m in experts)
    if args.check and group.is_main:  # after the group's renders: the other ranks are not held up in a collective
        for entry, latent in zip(renders, latents):
            entry.update(_check_against_one_process(shot, group, dtype, latent, kernels, compiled, entry["guidance"]))
    report = {"configured": group.configured.describe(), "world_size": group.world_size, "backend": group.backend,
              "device": str(group.device), "model": args.model or f"tiny_{args.task}", "grid": args.grid,
              "steps": args.steps, "dtype": args.dtype, "renders": renders, "meshes": len(group.meshes),
              "compiled": compiled, "code_version": code_version()}
    if group.is_main:
        print(json.dumps(report, ensure_ascii=False), flush=True)
    group.barrier()
    return report


def _check_against_one_process(shot, group, dtype, latent: torch.Tensor, kernels: KernelSettings,
                               group_compiled: bool, guidance: float | None = None) -> dict:
    """The same shot on rank 0 alone, run like the group ran: compiled if the group's blocks compiled (FSDP-sharded
    experts stay eager under compile=auto, so their reference is eager too), with the same kernel settings
    otherwise. A comparison of unlike paths would measure compile's or a kernel's rounding, not the layout's."""
    ref_kernels = replace(kernels, compile="on" if group_compiled else "off")
    experts = shot.experts(dtype, group.device, ref_kernels)
    ref = run_shot(shot, _local(group), dtype, experts=experts, kernels=ref_kernels,
                   guidance=guidance)  # final latent [1, C, F, H, W]
    ref_compiled = any(blocks_compiled(m) for m in experts)
    if ref_compiled != group_compiled:
        raise RuntimeError(f"--check compared unlike paths: group compiled={group_compiled}, "
                           f"reference compiled={ref_compiled}")
    return {"max_rel_err": ((latent - ref).abs().max() / ref.abs().max()).item(),
            "compared": "compiled vs compiled" if group_compiled else "eager vs eager",
            "reference_attention_backend": resolved_backend(ref_kernels.attention)}


def _local(group):
    """A one-rank view of the group for the reference render: same device, no parallelism."""
    from renderer.parallel.group import RenderGroup

    return RenderGroup(ParallelConfig(fsdp=False), device=group.device)


if __name__ == "__main__":
    main()
