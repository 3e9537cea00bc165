"""Ancestral Euler: an Euler step to sigma_down, then fresh noise of std sigma_up (k-diffusion
``sample_euler_ancestral``, after Ho et al. 2020's ancestral sampling); diffusers
``EulerAncestralDiscreteScheduler``."""

from __future__ import annotations

from sdjax import predictions
from sdjax.samplers import euler
from sdjax.samplers.record import Sampler, no_state
from sdjax.samplers.sigmas import ancestral_step, to_d


def step(plan, x, state, out, row, noise, eta):
    sigma = row.coef["sigma"]
    sigma_down, sigma_up = ancestral_step(sigma, row.coef["sigma_next"])
    d = to_d(x, sigma, predictions.denoised(plan.prediction_type, x, out, sigma))
    return x + d * (sigma_down - sigma) + noise.normal() * sigma_up, state


SAMPLER = Sampler(
    "euler_ancestral",
    "EulerAncestralDiscreteScheduler",
    euler.plan,
    step,
    no_state,
    noise="always",
    karras=True,
    finite_sigma_max=True,
)
