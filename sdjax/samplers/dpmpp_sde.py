"""DPM-Solver++ SDE (k-diffusion ``sample_dpmpp_sde``; Lu et al. 2022, "DPM-Solver++", arXiv:2211.01095): per
step, an ancestral data-prediction step to the log-midpoint sigma_mid = sqrt(sigma_i sigma_{i+1}), a model
evaluation there, and the full ancestral step from x_i with that x0 prediction; the noise of both sub-steps is
the increment of one Brownian motion per image (:meth:`sdjax.samplers.noise.StepNoise.brownian`), so that the
two see correlated noise as the SDE requires. The last step (to 0) is Euler. diffusers ``DPMSolverSDEScheduler``.

Each sub-step from sigma to s with x0 prediction D: (sigma_down, sigma_up) = ancestral_step(sigma, s);
x <- D + (sigma_down / sigma) (x_i - D) + sigma_up * (W(s) - W(sigma)) / sqrt(|s - sigma|).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from sdjax import predictions
from sdjax.samplers import dpm2, spacing
from sdjax.samplers.dpm2 import interleave
from sdjax.samplers.noise import brownian_rows
from sdjax.samplers.plan import build
from sdjax.samplers.record import Sampler
from sdjax.samplers.sigmas import all_sigmas, timesteps_from_sigmas


def _ancestral(sigma_from, sigma_to):
    """(sigma_down, sigma_up) as DPMSolverSDEScheduler computes them (sigma_up capped at sigma_to)."""
    sigma_up = np.minimum(sigma_to, np.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    return np.sqrt(sigma_to**2 - sigma_up**2), sigma_up


def plan(cfg, ac, num_steps, t_start, karras):
    sigmas, ts = spacing.discrete_sigmas(ac, cfg, num_steps, karras)
    s = sigmas.astype(np.float64)
    n = num_steps
    mid = np.exp(-(-np.log(s[: n - 1]) + 0.5 * (np.log(s[: n - 1]) - np.log(s[1:n]))))  # t = -log sigma
    down_mid, up_mid = _ancestral(s[: n - 1], mid)
    down, up = _ancestral(s[: n - 1], s[1:n])
    ts, c_in, levels, rows = dpm2.midpoint_rows(
        sigmas, np.append(mid, 0.0).astype(np.float32), ts, timesteps_from_sigmas(mid, ac), sigmas[1:], t_start
    )
    k = slice(2 * t_start, None)
    # Each sub-step lands on D + ratio (x_i - D): ratio = sigma_down / sigma_i, and 0 for the final Euler step.
    rows["ratio"] = interleave(np.append(down_mid / s[: n - 1], 0.0), down / s[: n - 1])[k]
    rows["sigma_up"] = interleave(np.append(up_mid, 0.0), up)[k]
    # Both sub-steps' noise is the Brownian increment from sigma_i: to sigma_mid, then to sigma_{i+1}.
    top = float(all_sigmas(ac).max())
    rows |= brownian_rows("noise_from", interleave(s[:n], s[: n - 1])[k], top)
    rows |= brownian_rows("noise_to", interleave(np.append(mid, s[n - 1]), s[1:n])[k], top)
    return build(ts, c_in, *levels, rows, {"brownian_top": top}, spacing.init_noise_sigma(cfg, sigmas))


def initial_state(plan, x):
    return jnp.zeros_like(x)  # x at the start of the step


def step(plan, x, x_first, out, row, noise, eta):
    c = row.coef
    x0 = predictions.denoised(plan.prediction_type, x, out, c["sigma"])
    x_first = jnp.where(c["second"] > 0, x_first, x)
    x = x0 + c["ratio"] * (x_first - x0)
    return x + c["sigma_up"] * noise.brownian(c, "noise_from", "noise_to"), x_first


SAMPLER = Sampler(
    "dpmpp_sde",
    "DPMSolverSDEScheduler",
    plan,
    step,
    initial_state,
    noise="always",
    karras=True,
    order=2,
    prediction_types=("epsilon", "v_prediction"),
)
