"""Sampler parity with diffusers' schedulers configured for flow matching, on the official Wan2.2 schedules.

Achieved (40 steps, shift 12 and 5, fake velocity below): timesteps and σ tables identical; every
intermediate sample within ~1e-6 relative (max |ours − ref| / max |ref|) of diffusers.  The tests
assert 1e-5.
"""
import math

import numpy as np
import pytest
import torch
from diffusers import (DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler,
                       UniPCMultistepScheduler)

from renderer.sampling import (FlowDPMpp2M, FlowEuler, FlowUniPC, build_schedule, make_sampler,
                               shift_sigmas)

STEPS = 40
REL_TOL = 1e-5


def _fake_model(shape=(1, 4, 3, 6, 8), seed=0):
    """Deterministic, non-linear velocity field that depends on both x and t, so that history and
    corrector errors would propagate into later samples."""
    g = torch.Generator().manual_seed(seed)
    x_init = torch.randn(shape, generator=g)  # [B, C, F, H, W]
    ref = torch.randn(shape, generator=g)

    def velocity(x, t):
        return 0.6 * torch.sin(x) + 0.25 * math.cos(t / 53.0) * ref + 0.1 * x

    return x_init, velocity


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _official_grid(steps):
    """Unshifted UniPC grid of the official code: linspace(float32(0.999), 0, steps+1)[:-1]."""
    return np.linspace(float(np.float32(0.999)), 0.0, steps + 1)[:-1]


def _run_pair(ours, sched, ref_timesteps, same_model_t=False):
    """Step both samplers from the same start, each feeding the model its own timestep (or, with
    same_model_t, both feeding ours, for a reference whose timesteps are not truncated)."""
    x_init, velocity = _fake_model()
    a, b = x_init.clone(), x_init.clone()
    worst = 0.0
    for i, t in enumerate(ref_timesteps):
        a = ours.step(velocity(a, float(ours.timesteps[i])), i, a)
        t_model = float(ours.timesteps[i]) if same_model_t else float(t)
        b = sched.step(velocity(b, t_model), t, b, return_dict=False)[0]
        worst = max(worst, _rel(a, b))
        assert worst < REL_TOL, f"step {i}: relative error {worst:.3e}"
    return worst


@pytest.mark.parametrize("shift", [12.0, 5.0])
def test_unipc_matches_diffusers(shift):
    sched = UniPCMultistepScheduler(
        num_train_timesteps=1000, solver_order=2, prediction_type="flow_prediction",
        use_flow_sigmas=True, flow_shift=shift, solver_type="bh2", predict_x0=True,
        lower_order_final=True, final_sigmas_type="zero")
    # diffusers' default flow grid starts at 1.0 − 1e-6; pass the official grid (it applies the shift).
    sched.set_timesteps(sigmas=_official_grid(STEPS))
    ours = make_sampler("unipc", STEPS, shift)
    assert isinstance(ours, FlowUniPC) and ours.variant == "bh2" and ours.order == 2
    assert torch.equal(ours.timesteps, sched.timesteps.float())
    assert torch.allclose(ours.sigmas, sched.sigmas, rtol=1e-6, atol=0)
    assert ours.sigmas[-1] == 0 and ours.sigmas.shape == (STEPS + 1,)
    _run_pair(ours, sched, sched.timesteps)


@pytest.mark.parametrize("shift", [12.0, 5.0])
def test_dpmpp_2m_matches_diffusers(shift):
    sched = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, solver_order=2, prediction_type="flow_prediction",
        use_flow_sigmas=True, flow_shift=shift, algorithm_type="dpmsolver++", solver_type="midpoint",
        lower_order_final=True, final_sigmas_type="zero")
    sched.set_timesteps(STEPS)
    # diffusers' DPM set_timesteps cannot take custom sigmas and builds the 0.999 grid, while the
    # official dpm++ path uses linspace(1, 0): install the official table (its step only reads
    # self.sigmas / self.timesteps), checked against the fp64 formula here.
    base = np.linspace(1.0, 0.0, STEPS + 1)[:STEPS]
    ref_sig = shift_sigmas(base, shift)  # float64
    sched.sigmas = torch.from_numpy(np.append(ref_sig, 0.0).astype(np.float32))
    sched.timesteps = torch.from_numpy((ref_sig * 1000).astype(np.int64))
    ours = make_sampler("dpm++", STEPS, shift)
    assert isinstance(ours, FlowDPMpp2M)
    assert ours.sigmas[0] == 1.0 and ours.timesteps[0] == 1000
    assert torch.equal(ours.sigmas, sched.sigmas)
    assert torch.equal(ours.timesteps, sched.timesteps.float())
    _run_pair(ours, sched, sched.timesteps)


@pytest.mark.parametrize("shift", [12.0, 5.0])
def test_euler_matches_diffusers(shift):
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(sigmas=list(_official_grid(STEPS)))  # diffusers shifts (in float32)
    ours = make_sampler("euler", STEPS, shift)
    assert isinstance(ours, FlowEuler)
    assert torch.allclose(ours.sigmas, sched.sigmas, rtol=1e-6, atol=0)
    # diffusers keeps float timesteps; ours are the truncated values the official code feeds the DiT.
    assert torch.equal(ours.timesteps, torch.floor(sched.timesteps.double() + 1e-4).float())
    _run_pair(ours, sched, sched.timesteps, same_model_t=True)


@pytest.mark.parametrize("grid", ["unipc", "dpm++"])
@pytest.mark.parametrize("steps,shift", [(40, 12.0), (50, 5.0), (7, 1.0)])
def test_schedule_matches_fp64_formula(grid, steps, shift):
    sigmas, timesteps = build_schedule(steps, shift, grid)
    start = 1.0 if grid == "dpm++" else float(np.float32(0.999))
    for i in range(steps):
        s = start * (1 - i / steps)
        s_shift = shift * s / (1 + (shift - 1) * s)
        assert abs(float(sigmas[i]) - s_shift) <= 1e-7 * s_shift
        assert float(timesteps[i]) == math.floor(s_shift * 1000 + 1e-9)
    assert float(sigmas[-1]) == 0.0
    assert torch.all(timesteps[:-1] > timesteps[1:])  # strictly high → low
    assert timesteps.dtype == torch.float32 and sigmas.dtype == torch.float32


@pytest.mark.parametrize("name", ["unipc", "dpm++"])
def test_a14b_boundaries(name):
    # t2v-A14B: shift 12, 40 steps, boundary 0.875 → 26 high-noise steps; i2v: shift 5, 0.9 → 15.
    t2v = make_sampler(name, 40, 12.0).timesteps
    i2v = make_sampler(name, 40, 5.0).timesteps
    assert int((t2v >= 875).sum()) == 26
    assert int((i2v >= 900).sum()) == 15


def test_euler_exact_for_constant_velocity():
    # On x = (1−σ)·x0 + σ·ε with v = ε − x0 constant, Euler lands exactly on x0.
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 3, 4, 5, generator=g)
    s = make_sampler("euler", 10, 3.0)
    x = (1 - s.sigmas[0]) * x0 + s.sigmas[0] * eps
    for i in range(10):
        x = s.step(eps - x0, i, x)
    assert torch.allclose(x, x0, atol=1e-5)


@pytest.mark.parametrize("name", ["unipc", "dpm++", "euler"])
def test_perfect_model_recovers_x0(name):
    # With the exact velocity of a straight path, every solver's final step returns x0.
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(1, 4, 2, 4, 4, generator=g), torch.randn(1, 4, 2, 4, 4, generator=g)
    s = make_sampler(name, 12, 5.0)
    x = (1 - s.sigmas[0]) * x0 + s.sigmas[0] * eps
    for i in range(12):
        x = s.step(eps - x0, i, x)
    assert torch.allclose(x, x0, atol=1e-4)


def test_dtype_state_and_errors():
    x_init, velocity = _fake_model()
    s = make_sampler("unipc", 6, 5.0)
    xb = x_init.to(torch.bfloat16)
    out = s.step(velocity(xb.float(), 999.0).to(torch.bfloat16), 0, xb)
    assert out.dtype == torch.bfloat16 and out.shape == xb.shape
    with pytest.raises(ValueError, match="expected step index 1"):
        s.step(velocity(out.float(), 0.0), 2, out)
    with pytest.raises(IndexError):
        s.step(velocity(out.float(), 0.0), 6, out)
    with pytest.raises(ValueError, match="unipc, dpm\\+\\+, euler"):
        make_sampler("ddim", 10, 5.0)

    # Restarting at index 0 resets the history: two renders from one sampler are identical.
    def render(sampler):
        x = x_init.clone()
        for i in range(6):
            x = sampler.step(velocity(x, float(sampler.timesteps[i])), i, x)
        return x

    s2 = make_sampler("unipc", 6, 5.0)
    first, second = render(s2), render(s2)
    assert torch.equal(first, second)
    assert torch.equal(first, render(make_sampler("unipc", 6, 5.0)))


def test_corrector_changes_result():
    # The UniC corrector is on by default and matters: disabling it gives a different trajectory.
    x_init, velocity = _fake_model()

    def render(sampler):
        x = x_init.clone()
        for i in range(8):
            x = sampler.step(velocity(x, float(sampler.timesteps[i])), i, x)
        return x

    with_c = render(FlowUniPC(8, 5.0))
    without = render(FlowUniPC(8, 5.0, use_corrector=False))
    assert _rel(with_c, without) > 1e-3
