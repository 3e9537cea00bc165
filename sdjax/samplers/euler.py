"""Euler's method on the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma: Karras et al. 2022,
"Elucidating the Design Space of Diffusion-Based Generative Models", arXiv:2206.00364, Algorithm 2 without churn;
diffusers ``EulerDiscreteScheduler``. With ``timestep_spacing="trailing"`` this is how SDXL-Lightning and
Hyper-SD's few-step models are sampled."""

from __future__ import annotations

from sdjax import predictions
from sdjax.samplers import spacing
from sdjax.samplers.plan import build, ve_levels
from sdjax.samplers.record import Sampler, no_state
from sdjax.samplers.sigmas import input_scaling, to_d


def plan(cfg, ac, num_steps, t_start, karras):
    """One evaluation per step at sigma_i; rows "sigma" and "sigma_next" (also euler_ancestral's plan)."""
    sigmas, ts = spacing.discrete_sigmas(ac, cfg, num_steps, karras)
    s = slice(t_start, num_steps)
    return build(
        ts[s],
        input_scaling(sigmas[s]),
        *ve_levels(sigmas[s]),
        {"sigma": sigmas[s], "sigma_next": sigmas[1:][s]},
        init_noise_sigma=spacing.init_noise_sigma(cfg, sigmas),
    )


def step(plan, x, state, out, row, noise, eta):
    sigma = row.coef["sigma"]
    d = to_d(x, sigma, predictions.denoised(plan.prediction_type, x, out, sigma))
    return x + d * (row.coef["sigma_next"] - sigma), state


SAMPLER = Sampler("euler", "EulerDiscreteScheduler", plan, step, no_state, karras=True, finite_sigma_max=True)
