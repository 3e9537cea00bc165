"""Heun's second-order method on the probability-flow ODE: Karras et al. 2022, arXiv:2206.00364, Algorithm 1
(an Euler predictor, then the trapezoid corrector with the slope at the predicted point); diffusers
``HeunDiscreteScheduler``."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from sdjax import predictions
from sdjax.samplers import alphas, spacing
from sdjax.samplers.plan import build, ve_levels
from sdjax.samplers.record import Sampler
from sdjax.samplers.sigmas import input_scaling, to_d


def plan(cfg, ac, num_steps, t_start, karras):
    sigmas, ts = spacing.discrete_sigmas(ac, cfg, num_steps, karras)
    # Interleave as HeunDiscreteScheduler: predictor at sigma_i, corrector at sigma_{i+1} (none at sigma = 0).
    sig = np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]])
    ts = np.concatenate([ts[:1], np.repeat(ts[1:], 2)])
    k = np.arange(2 * t_start, len(ts))
    rows = {"sigma": sig[k], "sigma_next": sig[k + 1], "corrector": k % 2}
    return build(
        ts[k], input_scaling(sig[k]), *ve_levels(sig[k]), rows, init_noise_sigma=spacing.init_noise_sigma(cfg, sig)
    )


def initial_state(plan, x):
    return jnp.zeros_like(x), jnp.zeros((), x.dtype), jnp.zeros_like(x)  # predictor slope, dt, sample


def step(plan, x, state, out, row, noise, eta):
    d_first, dt_first, x_first = state
    sigma, corrector = row.coef["sigma"], row.coef["corrector"] > 0
    d = to_d(x, sigma, alphas.clip(plan.clip_sample_range, predictions.denoised(plan.prediction_type, x, out, sigma)))
    d = jnp.where(corrector, (d_first + d) / 2, d)
    dt = jnp.where(corrector, dt_first, row.coef["sigma_next"] - sigma)
    x = jnp.where(corrector, x_first, x)
    return x + d * dt, (d, dt, x)


SAMPLER = Sampler("heun", "HeunDiscreteScheduler", plan, step, initial_state, karras=True, order=2)
