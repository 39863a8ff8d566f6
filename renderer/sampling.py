"""Flow-matching samplers for Wan2.2 (velocity prediction).

The model predicts a velocity v on the straight path x_σ = (1-σ)·x0 + σ·ε, so the clean-sample
estimate is x0 = x − σ·v.  Three samplers share one schedule object:

* ``FlowUniPC``   – UniPC multistep (B(h) = bh2, order 2, with the UniC corrector): the Wan default.
* ``FlowDPMpp2M`` – DPM-Solver++ 2M (midpoint), the official ``--sample_solver dpm++``.
* ``FlowEuler``   – first-order Euler on the velocity; no official counterpart, handy as a baseline.

Schedules follow the official Wan2.2 generate code, which builds them differently per solver:

* unipc (and our euler): σ = linspace(σ_max, 0, steps+1)[:-1] with σ_max = float32(0.999) (the first
  entry of a 1000-step training grid), shifted σ' = shift·σ / (1 + (shift−1)·σ);
* dpm++: σ = linspace(1, 0, steps+1)[:-1], same shift (so the first σ' is exactly 1).

In both, σ' is computed in float64, stored as float32 with a final 0 appended, and the timestep the DiT
receives is int64(σ'·1000) — truncated, not rounded.  We keep that truncation (as float values) so
renders match the reference bit-for-bit in what the model sees; t ≥ boundary·1000 comparisons are
unaffected because truncation cannot move a value across an integer boundary.

Samplers are stateful (they keep past x0 predictions); ``step(v, 0, x)`` starts a new render, and any
other index must follow the previous one.  All arithmetic is fp32 on tensors; scalar coefficients are
computed in float64 from the float32 σ table.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

NUM_TRAIN_TIMESTEPS = 1000
SAMPLER_NAMES = ("unipc", "dpm++", "euler", "euler_lightning")


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """σ' = shift·σ / (1 + (shift−1)·σ): spends more steps at high noise when shift > 1."""
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def build_schedule(steps: int, shift: float, grid: str = "unipc") -> tuple[Tensor, Tensor]:
    """Return (sigmas [steps+1] float32 ending in 0, timesteps [steps] float32 = trunc(σ'·1000)).

    grid="unipc" starts the unshifted grid at float32(0.999), grid="dpm++" at 1.0 (see module doc).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    if grid == "unipc":
        # The reference reads σ_max back from a float32 tensor, hence float32(0.999) rather than 0.999.
        sigma_max = float(np.float32(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS))
        base = np.linspace(sigma_max, 0.0, steps + 1)[:-1]  # [steps] float64
    elif grid == "dpm++":
        base = np.linspace(1.0, 0.0, steps + 1)[:steps]  # [steps] float64
    elif grid == "lightning":
        # Wan2.2-Lightning's EulerScheduler (ModelTC/Wan2.2-Lightning wan/utils/fm_solvers_euler.py): the grid is
        # float32 linspace(1000, 0, steps+1)/1000, shifted in float32, and the DiT gets σ'·1000 untruncated.
        grid32 = np.linspace(NUM_TRAIN_TIMESTEPS, 0, steps + 1, dtype=np.float32) / np.float32(NUM_TRAIN_TIMESTEPS)
        sig32 = shift_sigmas(grid32, np.float32(shift)).astype(np.float32)  # [steps+1], ends in 0
        return torch.from_numpy(sig32), torch.from_numpy((sig32[:-1] * np.float32(NUM_TRAIN_TIMESTEPS)))
    else:
        raise ValueError(f"unknown schedule grid {grid!r}; valid: 'unipc', 'dpm++', 'lightning'")
    shifted = shift_sigmas(base, float(shift))  # [steps] float64
    timesteps = (shifted * NUM_TRAIN_TIMESTEPS).astype(np.int64)  # truncation, as the reference does
    sigmas = np.concatenate([shifted, [0.0]]).astype(np.float32)  # [steps+1]
    return torch.from_numpy(sigmas), torch.from_numpy(timesteps.astype(np.float32))


def _lam(sigma: float) -> float:
    """Half log-SNR λ = log((1−σ)/σ); ±inf at the path ends (σ=1 → −inf, σ=0 → +inf)."""
    if sigma <= 0.0:
        return math.inf
    if sigma >= 1.0:
        return -math.inf
    return math.log(1.0 - sigma) - math.log(sigma)


class FlowSampler:
    """Base class: schedule, index bookkeeping and dtype handling; subclasses implement `_step`."""

    name = "base"
    grid = "unipc"

    def __init__(self, steps: int, shift: float):
        self.steps = int(steps)
        self.shift = float(shift)
        self.sigmas, self.timesteps = build_schedule(self.steps, self.shift, self.grid)
        # Python floats (exactly the float32 values) for the scalar coefficient algebra.
        self._sig = [float(s) for s in self.sigmas]
        self.reset()

    def reset(self) -> None:
        """Forget the history so the sampler can run a new render."""
        self._next = 0

    def step(self, velocity: Tensor, index: int, sample: Tensor) -> Tensor:
        """Advance `sample` from σ[index] to σ[index+1] given the model velocity at σ[index]."""
        if not 0 <= index < self.steps:
            raise IndexError(f"step index {index} outside [0, {self.steps})")
        if index == 0:
            self.reset()
        elif index != self._next:
            # Multistep history would silently be wrong if steps were skipped or repeated.
            raise ValueError(f"{self.name}: expected step index {self._next}, got {index}; "
                             "call reset() or start again at index 0")
        if velocity.shape != sample.shape:
            raise ValueError(f"velocity shape {tuple(velocity.shape)} != sample shape {tuple(sample.shape)}")
        out = self._step(velocity.float(), index, sample.float())  # same shape as sample, fp32
        self._next = index + 1
        return out.to(sample.dtype)

    def x0(self, velocity: Tensor, index: int, sample: Tensor) -> Tensor:
        """Clean-sample estimate x0 = x − σ·v (fp32)."""
        return sample.float() - self._sig[index] * velocity.float()

    def _step(self, v: Tensor, i: int, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class FlowEuler(FlowSampler):
    """x_{i+1} = x_i + (σ_{i+1} − σ_i)·v — exact for a constant velocity field."""

    name = "euler"

    def _step(self, v: Tensor, i: int, x: Tensor) -> Tensor:
        return x + (self._sig[i + 1] - self._sig[i]) * v


class FlowDPMpp2M(FlowSampler):
    """DPM-Solver++ 2M (data prediction, midpoint variant) on the flow path.

    First step and last step are first order (warm-up, and the final σ=0 step as the reference does with
    final_sigmas_type="zero"); the rest use the previous x0 for a second-order correction.
    """

    name = "dpm++"
    grid = "dpm++"

    def reset(self) -> None:
        super().reset()
        self._prev_x0: Tensor | None = None

    def _step(self, v: Tensor, i: int, x: Tensor) -> Tensor:
        s0, t = self._sig[i], self._sig[i + 1]
        m0 = x - s0 * v  # x0 estimate at σ_i
        h = _lam(t) - _lam(s0)
        # σ_t/σ_s0·x − α_t(e^{−h} − 1)·D ; at σ_s0 = 1 (dpm++ grid start) e^{−h} = 0 and h = inf.
        coef_x = t / s0
        coef_d = -(1.0 - t) * (math.exp(-h) - 1.0)
        second = self._prev_x0 is not None and i < self.steps - 1
        if second:
            h0 = _lam(s0) - _lam(self._sig[i - 1])
            # r0 = h0/h; when σ_{i−1}=1 the previous λ is −inf, r0 = inf and the D1 term vanishes.
            inv_r0 = h / h0
            d = m0 + 0.5 * inv_r0 * (m0 - self._prev_x0)  # D0 + ½·D1
        else:
            d = m0
        self._prev_x0 = m0
        return coef_x * x + coef_d * d


class FlowUniPC(FlowSampler):
    """UniPC multistep in data (x0) prediction: UniP predictor + UniC corrector.

    variant "bh2" (B(h) = e^{−h}−1, the default) or "bh1" (B(h) = −h).  order is 1 or 2; the effective
    order warms up from 1 at step 0 and drops to 1 on the final step, as in the reference.  The corrector
    refines the incoming sample with the new model output before predicting; it is off at step 0 (no
    previous step) unless `disable_corrector` lists more steps (indices of the *previous* step, as in
    the reference's convention).
    """

    name = "unipc"

    def __init__(self, steps: int, shift: float, variant: str = "bh2", order: int = 2,
                 use_corrector: bool = True, disable_corrector: tuple[int, ...] = ()):
        if variant not in ("bh1", "bh2"):
            raise ValueError(f"UniPC variant must be 'bh1' or 'bh2', got {variant!r}")
        if order not in (1, 2):
            raise ValueError(f"UniPC order must be 1 or 2, got {order}")
        self.variant, self.order = variant, order
        self.use_corrector = use_corrector
        self.disable_corrector = set(disable_corrector)
        super().__init__(steps, shift)

    def reset(self) -> None:
        super().reset()
        self._x0s: list[Tensor] = []  # newest last, at most `order` entries
        self._last_sample: Tensor | None = None  # corrected sample the last predictor started from
        self._last_order = 0

    def _coeffs(self, s_from: float, s_to: float) -> tuple[float, float, float, float]:
        """(h, α_to, h·φ1 = e^{−h}−1, B(h)) for a step from σ=s_from to σ=s_to."""
        h = _lam(s_to) - _lam(s_from)
        hphi1 = math.expm1(-h)
        b_h = hphi1 if self.variant == "bh2" else -h
        return h, 1.0 - s_to, hphi1, b_h

    def _predict(self, x: Tensor, i: int, order: int) -> Tensor:
        s0, t = self._sig[i], self._sig[i + 1]
        h, alpha_t, hphi1, b_h = self._coeffs(s0, t)
        m0 = self._x0s[-1]
        out = (t / s0) * x - (alpha_t * hphi1) * m0  # first-order (DDIM-like) part
        if order == 2:
            r1 = (_lam(self._sig[i - 1]) - _lam(s0)) / h  # negative: the older point is noisier
            d1 = (self._x0s[-2] - m0) / r1
            out = out - (alpha_t * b_h * 0.5) * d1  # the reference fixes ρ_p = ½ for order 2
        return out

    def _correct(self, m_new: Tensor, i: int) -> Tensor:
        """UniC: redo the step σ_{i−1} → σ_i from the stored previous sample, now that the model output
        at σ_i is known.  Like the reference, the result depends on the incoming sample only through
        m_new, so edits a caller makes to the sample between steps are dropped at corrected steps."""
        order = self._last_order
        s0, t = self._sig[i - 1], self._sig[i]
        h, alpha_t, hphi1, b_h = self._coeffs(s0, t)
        m0 = self._x0s[-1]
        hh = -h
        # b_k = k!·h·φ_{k+1}(h)/B(h), built with the reference's recurrence on g_k = h·φ_k-style terms.
        g1 = hphi1 / hh - 1.0
        b1 = g1 / b_h
        base = (t / s0) * self._last_sample - (alpha_t * hphi1) * m0
        if order == 1:
            corr = 0.5 * (m_new - m0)  # reference uses ρ_c = ½ for UniC-1 rather than b1
        else:
            g2 = g1 / hh - 0.5
            b2 = g2 * 2.0 / b_h
            r1 = (_lam(self._sig[i - 2]) - _lam(s0)) / h
            # Solve [[1, 1], [r1, 1]]·[ρ0, ρ1] = [b1, b2] in closed form.
            rho0 = (b1 - b2) / (1.0 - r1)
            rho1 = b1 - rho0
            corr = rho0 * ((self._x0s[-2] - m0) / r1) + rho1 * (m_new - m0)
        return base - (alpha_t * b_h) * corr

    def _step(self, v: Tensor, i: int, x: Tensor) -> Tensor:
        m_new = x - self._sig[i] * v  # x0 estimate at σ_i, fp32
        if (self.use_corrector and i > 0 and self._last_sample is not None
                and (i - 1) not in self.disable_corrector):
            x = self._correct(m_new, i)
        self._x0s = (self._x0s + [m_new])[-self.order:]
        order = min(self.order, self.steps - i, i + 1)  # warm-up, then lower order on the last step
        self._last_sample, self._last_order = x, order
        return self._predict(x, i, order)


class FlowEulerLightning(FlowEuler):
    """Euler on the Wan2.2-Lightning schedule: what the 4-step distilled LoRAs were trained to sample with."""

    name = "euler_lightning"
    grid = "lightning"


_SAMPLERS = {"unipc": FlowUniPC, "dpm++": FlowDPMpp2M, "euler": FlowEuler, "euler_lightning": FlowEulerLightning}


def make_sampler(name: str, steps: int, shift: float) -> FlowSampler:
    """Fresh sampler by name ("unipc", "dpm++", "euler", "euler_lightning"); one per shot, or call reset()."""
    cls = _SAMPLERS.get(name)
    if cls is None:
        raise ValueError(f"unknown sampler {name!r}; valid names: {', '.join(SAMPLER_NAMES)}")
    return cls(steps, shift)
