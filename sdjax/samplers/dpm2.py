"""DPM-Solver-2 as k-diffusion ``sample_dpm_2`` (Karras et al. 2022, arXiv:2206.00364, Algorithm 2's second-order
variant with the midpoint in log sigma, after Lu et al. 2022's DPM-Solver-2, arXiv:2206.00927): an Euler step
to the log-midpoint sigma_mid = sqrt(sigma_i sigma_{i+1}), a model evaluation there, and the full step from x_i
with that slope; the last step (to 0) is Euler. diffusers ``KDPM2DiscreteScheduler``.

Evaluations: (sigma_0), (sigma_mid_1, sigma_1), (sigma_mid_2, sigma_2), ...: 2N - 1 for N steps.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from sdjax import predictions
from sdjax.samplers import spacing
from sdjax.samplers.plan import build, ve_levels
from sdjax.samplers.record import Sampler
from sdjax.samplers.sigmas import input_scaling, timesteps_from_sigmas, to_d


def interleave(first, second):
    """[first_0, second_0, first_1, second_1, ..., first_{N-1}]: one value per evaluation (2N - 1)."""
    out = np.empty(2 * len(first) - 1, np.float64)
    out[0::2], out[1::2] = first, second[: len(first) - 1]
    return out


def midpoint_rows(sigmas, sigmas_mid, ts, ts_mid, sigmas_to, t_start):
    """The rows of a two-evaluation midpoint method: step k's first evaluation at sigma_k steps (Euler) to
    sigma_mid_k; its second, at sigma_mid_k, restarts from x_k and steps to ``sigmas_to[k]``. The last step is
    first order. Returns (timesteps, c_in, add_noise levels, rows) for evaluations 2 t_start onwards."""
    n = len(ts)
    sigma_in = interleave(sigmas[:n], sigmas_mid)
    dt = interleave(sigmas_mid[:n] - sigmas[:n], sigmas_to[: n - 1] - sigmas[: n - 1])
    second = interleave(np.zeros(n), np.ones(n - 1))
    level = interleave(sigmas[:n], sigmas[1:n])  # diffusers' add_noise: the step's levels
    k = slice(2 * t_start, None)
    rows = {"sigma": sigma_in[k], "dt": dt[k], "second": second[k]}
    return interleave(ts, ts_mid)[k], input_scaling(sigma_in[k]), ve_levels(level[k]), rows


def plan(cfg, ac, num_steps, t_start, karras):
    sigmas, ts = spacing.discrete_sigmas(ac, cfg, num_steps, karras, round_karras=True)
    with np.errstate(divide="ignore"):  # the last midpoint, between sigma_{N-1} and 0, is 0
        sigmas_mid = np.exp((np.log(sigmas[1:]) + np.log(sigmas[:-1])) / 2).astype(np.float32)
    ts_mid = timesteps_from_sigmas(sigmas_mid, ac)
    ts, c_in, levels, rows = midpoint_rows(sigmas, sigmas_mid, ts, ts_mid, sigmas[1:], t_start)
    return build(ts, c_in, *levels, rows, init_noise_sigma=spacing.init_noise_sigma(cfg, sigmas))


def initial_state(plan, x):
    return jnp.zeros_like(x)  # x at the start of the step


def update(plan, x, x_first, out, row):
    """The deterministic part of a step of a midpoint method (also dpm2_ancestral's)."""
    sigma, second = row.coef["sigma"], row.coef["second"] > 0
    d = to_d(x, sigma, predictions.denoised(plan.prediction_type, x, out, sigma))
    x_first = jnp.where(second, x_first, x)
    return x_first + d * row.coef["dt"], x_first


def step(plan, x, state, out, row, noise, eta):
    return update(plan, x, state, out, row)


SAMPLER = Sampler(
    "dpm2",
    "KDPM2DiscreteScheduler",
    plan,
    step,
    initial_state,
    karras=True,
    order=2,
    prediction_types=("epsilon", "v_prediction"),
)
