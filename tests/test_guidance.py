"""Guiders ask the conditioner what each branch is; kernel settings belong to a pipeline, and a group agrees on
rank 0's attention choice."""
import socket

import pytest
import torch
import torch.multiprocessing as mp

from kernels import autotune
from kernels.settings import KernelSettings
from renderer.guidance import NoGuidance, ParallelCFG, SequentialCFG, make_guider


class FaceConditioner:
    """Like Animate: the uncond branch blanks an extra input (a face) as well as swapping the text."""

    branches = ("cond", "uncond")

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.text = {"cond": torch.randn(1, 5, 8, generator=g), "uncond": torch.randn(1, 5, 8, generator=g)}
        self.face = torch.randn(1, 3, generator=g)

    def prepare(self, latent):
        return latent

    def after_step(self, latent):
        return latent

    def model_inputs(self, latent, t, branch):
        face = self.face if branch == "cond" else torch.zeros_like(self.face)
        return {"x": latent, "t": torch.full((1,), float(t)), "context": self.text[branch], "face": face}

    def describe(self):
        return {}


def toy_model(x, t, context, face):
    return x * context.mean() + face.sum() + t / 1000  # [1, C, F, H, W]


def _expected(x, t, g, cond):
    v_c = toy_model(**cond.model_inputs(x, t, "cond"))
    v_u = toy_model(**cond.model_inputs(x, t, "uncond"))
    return v_u + g * (v_c - v_u)


def test_sequential_cfg_uses_the_conditioners_uncond_and_skips_it_at_scale_one():
    cond, x = FaceConditioner(), torch.randn(1, 2, 1, 2, 2)
    got = SequentialCFG().velocity(toy_model, cond, x, 500.0, 4.0)
    assert torch.equal(got, _expected(x, 500.0, 4.0, cond))
    calls = []
    counting = lambda **kw: calls.append(kw["face"].abs().sum().item()) or toy_model(**kw)  # noqa: E731
    SequentialCFG().velocity(counting, cond, x, 500.0, 1.0)
    NoGuidance().velocity(counting, cond, x, 500.0, 4.0)
    assert len(calls) == 2 and all(c > 0 for c in calls)  # only cond passes (the face is never blanked)
    assert isinstance(make_guider(None), SequentialCFG) and isinstance(make_guider(None, guidance=False), NoGuidance)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, out):
    from renderer.parallel import ParallelConfig, init_group

    torch.set_num_threads(1)
    group = init_group(ParallelConfig(cfg=2), "gloo", rank=rank, world_size=2, master_addr="127.0.0.1",
                       master_port=port)
    cond, x = FaceConditioner(), torch.randn(1, 2, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    v = ParallelCFG(group).velocity(toy_model, cond, x, 250.0, 3.5)
    # attention choice: rank 0 decided "math" for this shape, rank 1 would take "sdpa"; the group runs rank 0's
    dev = torch.device("cpu")
    if rank == 0:
        autotune.pin(dev, torch.float32, 16, 40, 40, "math")
    before = autotune.choose(dev, torch.float32, 16, 40, 40)
    agreed = autotune.prepare(dev, torch.float32, 1, 40, 40, 2, 16, agree=group.agree)
    after = autotune.choose(dev, torch.float32, 16, 40, 40)
    torch.save({"v": v, "before": before, "agreed": agreed, "after": after}, f"{out}/rank{rank}.pt")
    group.close()


def test_cfg_parallel_and_rank0_attention_choice_on_two_ranks(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    cond, x = FaceConditioner(), torch.randn(1, 2, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    want = _expected(x, 250.0, 3.5, cond)
    assert torch.allclose(r0["v"], want, rtol=0, atol=1e-6) and torch.equal(r0["v"], r1["v"])
    assert (r0["before"], r1["before"]) == ("math", "sdpa")
    assert r0["agreed"] == r1["agreed"] == r1["after"] == "math"


def test_kernel_settings_belong_to_the_pipeline_and_change_the_render_hash():
    from renderer.output import render_hash
    from renderer.pipeline import Pipeline, RenderOptions, ShotSpec
    from renderer.presets import load_preset

    preset = load_preset("tiny_t2v")
    a = Pipeline(preset, options=RenderOptions(kernels=KernelSettings(attention="math", fused=False), progress=False))
    b = Pipeline(preset, options=RenderOptions(progress=False))
    attn_a = {m.attn_backend for m in a.experts[0].modules() if hasattr(m, "attn_backend")}
    attn_b = {m.attn_backend for m in b.experts[0].modules() if hasattr(m, "attn_backend")}
    assert attn_a == {"math"} and attn_b == {"auto"}  # two pipelines in one process, each its own kernels
    assert not a.experts[0].blocks[0].fused and b.experts[0].blocks[0].fused
    shot = ShotSpec(prompt="p").resolve(preset)
    hashes = {render_hash(shot, preset.name, "fp", k) for k in (
        KernelSettings(), KernelSettings(attention="math"), KernelSettings(allow_lossy=True),
        KernelSettings(compile="off"), KernelSettings(precision="bf16"))}
    assert len(hashes) == 5
    la = a.render(ShotSpec(prompt="p", steps=2), keep_latent=True).latent
    lb = b.render(ShotSpec(prompt="p", steps=2), keep_latent=True).latent
    assert (la - lb).abs().max() / lb.abs().max() <= 1e-5  # math vs sdpa: the same numbers on the CPU


@pytest.mark.parametrize("bad,match", [({"attention": "fa9"}, "kernels.attention='fa9'"),
                                       ({"compile": "maybe"}, "kernels.compile='maybe'"),
                                       ({"precision": "fp8"}, "kernels.precision='fp8'"),
                                       ({"speed": 1}, "unknown kernel setting")])
def test_bad_kernel_settings_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        KernelSettings.from_dict(bad)
