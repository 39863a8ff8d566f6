"""The layout follows the shot's guidance (issue 14): a shot without CFG (draft tier, Animate, guidance 1) runs a
cfg=2 group with the cfg dim folded into ulysses (or ring) instead of leaving half of the group idle.

The mapping (renderer.parallel.effective_layout) and its messages; one render group switching layouts shot by shot
(the farm's case: drafts, then finals on the same group) equal to one process within 1e-5 (fp32, gloo); the
scaling harness's row planning. The CLI under torchrun and a farm job are in tests/test_layout_tier_group.py.
"""
from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

from renderer.parallel.config import (ParallelConfig, cfg_active, effective_layout, layout_change_note,
                                      layout_record)

TOL = 1e-5


# -- the mapping ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("configured, heads, expected", [
    (dict(cfg=2), 40, dict(ulysses=2)),  # gpus2 -> ulysses2
    (dict(cfg=2, ulysses=2), 40, dict(ulysses=4)),  # gpus4 -> ulysses4
    (dict(cfg=2, ulysses=4), 40, dict(ulysses=8)),  # gpus8 -> ulysses8
    (dict(cfg=2, ulysses=4), 24, dict(ulysses=8)),  # ti2v-5B: 24 % 8 == 0
    (dict(cfg=2, ulysses=4), 12, dict(ulysses=4, ring=2)),  # 12 % 8 != 0: into ring
    (dict(cfg=2), 5, dict(ring=2)),  # an odd head count cannot take ulysses 2
    (dict(cfg=2, ulysses=2, ring=2), 40, dict(ulysses=4, ring=2)),
])
def test_cfg_folds_into_ulysses_when_the_heads_divide_else_into_ring(configured, heads, expected):
    pcfg = ParallelConfig(fsdp=True, **configured)
    got = effective_layout(pcfg, False, heads)
    assert got == ParallelConfig(fsdp=True, **expected)  # fsdp, ulysses_impl kept
    assert got.world_size == pcfg.world_size


@pytest.mark.parametrize("configured, active", [(dict(cfg=2), True), (dict(cfg=2, ulysses=2), True),
                                                (dict(ulysses=2), False), (dict(), False),
                                                (dict(cfg=2, fold_idle_cfg=False), False)])
def test_layout_unchanged_with_cfg_or_without_a_cfg_dim_or_when_turned_off(configured, active):
    pcfg = ParallelConfig(**configured)
    assert effective_layout(pcfg, active, 40) is pcfg


def test_cfg_active_follows_the_guiders_rule():
    assert cfg_active(1.0) is False and cfg_active(1) is False and cfg_active((1.0, 1.0)) is False
    assert cfg_active(5.0) is True and cfg_active((3.0, 4.0)) is True
    assert cfg_active([1.0, 3.5]) is True  # one expert with CFG: the shot needs both passes for its steps
    with pytest.raises(ValueError) as e:
        cfg_active("high")
    assert str(e.value) == ("guidance 'high' is not a number: give one scale (guidance=5.0) or one per expert "
                            "(guidance=[3.0,4.0])")


@pytest.mark.parametrize("call, message", [
    (lambda: effective_layout(ParallelConfig(cfg=2), "no", 40),
     "cfg_active must be True or False (does the shot's guider run cond and uncond each step?), got 'no'"),
    (lambda: effective_layout(ParallelConfig(cfg=2), False, 0),
     "num_heads=0 must be a positive integer (the model's attention head count)"),
    (lambda: effective_layout(ParallelConfig(cfg=2, ulysses=3), False, 40),
     "parallel.ulysses=3 does not divide the model's 40 heads: choose 1, 2, 4, 5, 8, 10, 20 or 40"),
    (lambda: ParallelConfig(cfg=2, fold_idle_cfg="yes"), "parallel.fold_idle_cfg must be true or false, got 'yes'"),
])
def test_validation_messages(call, message):
    with pytest.raises(ValueError) as e:
        call()
    assert str(e.value) == message


def test_the_change_is_one_line_and_a_record():
    gpus2, folded = ParallelConfig(cfg=2), ParallelConfig(ulysses=2)
    assert layout_change_note(gpus2, gpus2) is None
    assert layout_change_note(gpus2, folded, "shot s1") == (
        "parallel: shot s1 runs without CFG (one forward per step): layout cfg2 -> ulysses2 on the same 2 GPUs "
        "(parallel.fold_idle_cfg=false keeps cfg2)")
    rec = layout_record(gpus2, folded)
    assert (rec["configured"], rec["effective"], rec["folded_idle_cfg"]) == ("cfg2", "ulysses2", True)
    assert layout_record(gpus2, gpus2)["folded_idle_cfg"] is False


def test_fold_idle_cfg_comes_from_the_config():
    from renderer.conf import compose
    from renderer.settings import Settings

    s = Settings.from_config(compose(["parallel=gpus2", "parallel.fold_idle_cfg=false", "prompt=x"]))
    assert s.parallel == ParallelConfig(cfg=2, fold_idle_cfg=False)
    assert effective_layout(s.parallel, False, 40) == s.parallel


# -- the scaling harness ----------------------------------------------------------------------------------------------
def test_auto_rows_of_a_draft_run_ulysses_on_two_and_four_gpus():
    from benchmarks.scaling import load_config, plan_rows, tier_runs_cfg

    cfg = load_config("a14b_720p_tiers", ["gpus=[1,2,4]", "layouts=[auto,gpus2]"])
    assert [tier_runs_cfg(cfg, q) for q in ("exact", "fast", "draft")] == [True, True, False]
    rows, skipped = plan_rows(cfg, None)
    by = {(r["gpus"], r["quality"], r["layout"]): r for r in rows}
    assert by[(2, "exact", "gpus2")]["parallel"]["cfg"] == 2  # exact keeps CFG parallel
    draft2 = by[(2, "draft", "ulysses2+draft")]
    assert ParallelConfig.from_dict(draft2["parallel"]) == ParallelConfig(ulysses=2)
    assert draft2["layout_from"].startswith("auto: gpus2")
    draft4 = by[(4, "draft", "ulysses4+draft")]
    assert ParallelConfig.from_dict(draft4["parallel"]) == ParallelConfig(ulysses=4)
    # a named layout runs as named, idle half included: the measurement of what folding saves
    named = by[(2, "draft", "gpus2+draft")]["parallel"]
    assert (named["cfg"], named["fold_idle_cfg"]) == (2, False)
    # exact: auto is gpus2 already, so the named gpus2 row would measure the same layout twice
    assert {"gpus": 2, "layout": "gpus2", "why": "same layout as another 2-GPU row (cfg2)"} in skipped


# -- one group, the layout switched per shot ------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _render(shot, group, experts, guidance):
    from renderer.denoise import denoise
    from renderer.guidance import make_guider
    from renderer.sampling import make_sampler

    device = group.device if group is not None else torch.device("cpu")
    sampler = make_sampler(shot.sampler, shot.steps, shot.preset.shift)
    guider = make_guider(group)
    latent = denoise(experts, shot.conditioner(device, torch.float32), sampler, shot.noise.to(device),
                     guider=guider, boundary=shot.preset.boundary if len(experts) == 2 else None,
                     guidances=guidance, group=group)  # [1, C, F, H, W]
    return latent, guider.name


def _switching_worker(rank: int, port: int, fsdp: bool, out_path: str) -> None:
    """A farm group's life: start as gpus2 (cfg=2), render a draft-like shot (guidance 1), a final (guidance 5),
    then guidance 1 again — the experts loaded and parallelised once."""
    import torch.distributed as dist

    from renderer.parallel import init_group
    from renderer.parallel.selftest import tiny_shot

    torch.set_num_threads(1)
    configured = ParallelConfig(cfg=2, fsdp=fsdp)
    group = init_group(configured, "gloo", rank=rank, world_size=2, master_addr="127.0.0.1", master_port=port)
    shot = tiny_shot("t2v")
    heads = shot.dit.num_heads
    folded = effective_layout(configured, False, heads)
    group.prepare_layouts(folded)
    meshes = dict(group.meshes)
    experts = group.parallelize_experts(shot.experts())
    results = {"meshes": len(meshes)}
    attn_fns = []
    for i, g in enumerate((1.0, 5.0, 1.0)):
        pcfg = effective_layout(group.configured, cfg_active(g), heads)
        group.use_layout(pcfg, experts)
        attn_fns.append(experts[0].blocks[0].self_attn.attn_fn)
        latent, guider = _render(shot, group, experts, g)
        every = [torch.empty_like(latent) for _ in range(2)]
        dist.all_gather(every, latent)
        sp = [m.token_split.sp if m.token_split is not None else 1 for m in experts]  # each rank's token share
        results[f"{i}"] = (latent, (every[0] - every[1]).abs().max().item(), guider, group.pcfg.short_name(), sp)
    # no process group was built after start: the same mesh objects served every shot
    # a layout that comes back brings back its attention object: compiled blocks keep their graphs (no recompile)
    results["same_attn_fn"] = attn_fns[0] is attn_fns[2] and attn_fns[0] is not None and attn_fns[1] is None
    results["same_meshes"] = all(group.meshes[k] is v for k, v in meshes.items()) and len(group.meshes) == 2
    if rank == 0:
        torch.save(results, out_path)
    group.close()
    # Leave without the interpreter's teardown: a cfg=2 + FSDP group on gloo aborts at exit in about 1 of 4 runs
    # ("terminate called without an active exception", after close(); reproduced with no layout switch at all).
    # That teardown bug is not what this test checks, and everything it checks is saved above.
    import os

    os._exit(0)


@pytest.mark.parametrize("fsdp", [False, True])
def test_a_group_switches_layout_per_shot_and_matches_one_process(tmp_path, fsdp):
    from renderer.parallel.selftest import tiny_shot

    out = tmp_path / "r.pt"
    mp.spawn(_switching_worker, args=(_free_port(), fsdp, str(out)), nprocs=2, join=True)
    res = torch.load(out, weights_only=True)
    shot = tiny_shot("t2v")
    # guidance 1: Ulysses over both ranks (each expert holds half the tokens); guidance 5: CFG halves, whole tokens
    expected = [("ulysses2", "sequential", [2, 2]), ("cfg2", "cfg_parallel", [1, 1]), ("ulysses2", "sequential", [2, 2])]
    for i, g in enumerate((1.0, 5.0, 1.0)):
        ref, _ = _render(shot, None, shot.experts(), g)
        latent, spread, guider, layout, sp = res[f"{i}"]
        err = ((latent - ref).abs().max() / ref.abs().max()).item()
        assert err <= TOL and spread == 0.0, (i, g, err, spread)
        assert (layout, guider, sp) == expected[i]
    assert res["meshes"] == 2 and res["same_meshes"] and res["same_attn_fn"]
