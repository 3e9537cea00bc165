"""Ancestral DPM-Solver-2 (k-diffusion ``sample_dpm_2_ancestral``): each step is DPM-Solver-2's midpoint step
(``dpm2.py``) to sigma_down, the deterministic level of an ancestral step from sigma_i to sigma_{i+1}, then
fresh noise of std sigma_up; the midpoint is sqrt(sigma_i sigma_down) and the last step (to 0) is Euler.
diffusers ``KDPM2AncestralDiscreteScheduler``."""

from __future__ import annotations

import numpy as np

from sdjax.samplers import dpm2, spacing
from sdjax.samplers.dpm2 import interleave
from sdjax.samplers.plan import build
from sdjax.samplers.record import Sampler
from sdjax.samplers.sigmas import ancestral_step, timesteps_from_sigmas


def plan(cfg, ac, num_steps, t_start, karras):
    sigmas, ts = spacing.discrete_sigmas(ac, cfg, num_steps, karras, round_karras=True)
    sigmas64 = sigmas.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma_down, sigma_up = ancestral_step(sigmas64[:-1], sigmas64[1:])
        sigmas_mid = np.sqrt(sigmas64[:-1] * sigma_down).astype(np.float32)
    sigmas_mid[-1] = 0.0  # the last step is Euler to 0
    ts_mid = timesteps_from_sigmas(sigmas_mid, ac)
    ts, c_in, levels, rows = dpm2.midpoint_rows(sigmas, sigmas_mid, ts, ts_mid, sigma_down, t_start)
    rows["sigma_up"] = interleave(np.zeros(num_steps), sigma_up)[2 * t_start :]
    return build(ts, c_in, *levels, rows, init_noise_sigma=spacing.init_noise_sigma(cfg, sigmas))


def step(plan, x, state, out, row, noise, eta):
    x, state = dpm2.update(plan, x, state, out, row)
    return x + row.coef["sigma_up"] * noise.normal(), state


SAMPLER = Sampler(
    "dpm2_ancestral",
    "KDPM2AncestralDiscreteScheduler",
    plan,
    step,
    dpm2.initial_state,
    noise="always",
    karras=True,
    order=2,
    prediction_types=("epsilon", "v_prediction"),
)
