"""Linear multistep (k-diffusion ``sample_lms``, after Karras et al. 2022's ODE, arXiv:2206.00364): x_{i+1} =
x_i + sum_k c_k d_{i-k} with d = (x - D(x; sigma)) / sigma and c_k the integral over [sigma_i, sigma_{i+1}] of
the Lagrange polynomial through the last (up to 4) levels; diffusers ``LMSDiscreteScheduler`` (order 4, as its
pipelines call ``step``).

As diffusers, the order at step i is min(i + 1, 4) counted from the schedule's start, so an img2img run's first
steps use high-order weights on the few derivatives it has (the missing ones count as 0).
"""

from __future__ import annotations

import numpy as np

from sdjax import predictions
from sdjax.samplers import history, spacing
from sdjax.samplers.plan import build, ve_levels
from sdjax.samplers.record import Sampler
from sdjax.samplers.sigmas import input_scaling, to_d

ORDER = 4


def _coefficient(sigmas: np.ndarray, order: int, i: int, k: int) -> float:
    """The integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial of node sigma_{i-k} on the nodes
    sigma_i .. sigma_{i-order+1} (diffusers' ``get_lms_coefficient``, integrated exactly)."""
    nodes = [sigmas[i - j] for j in range(order) if j != k]
    basis = np.polynomial.Polynomial.fromroots(nodes) if nodes else np.polynomial.Polynomial([1.0])
    basis = basis / np.prod([sigmas[i - k] - n for n in nodes])
    integral = basis.integ()
    return float(integral(sigmas[i + 1]) - integral(sigmas[i]))


def plan(cfg, ac, num_steps, t_start, karras):
    sigmas, ts = spacing.discrete_sigmas(ac, cfg, num_steps, karras)
    s = np.arange(t_start, num_steps)
    sigmas64 = sigmas.astype(np.float64)
    rows = {"sigma": sigmas[s]}
    for k in range(ORDER):
        # Weight on the derivative k evaluations back: none before the run's first evaluation.
        rows[f"c{k}"] = [_coefficient(sigmas64, min(i + 1, ORDER), i, k) if k <= i - t_start and k <= i else 0.0
                         for i in s]  # fmt: skip
    return build(
        ts[s],
        input_scaling(sigmas[s]),
        *ve_levels(sigmas[s]),
        rows,
        init_noise_sigma=spacing.init_noise_sigma(cfg, sigmas),
    )


def initial_state(plan, x):
    return history.empty(ORDER, x)  # the last derivatives, newest first


def step(plan, x, state, out, row, noise, eta):
    sigma = row.coef["sigma"]
    d = to_d(x, sigma, predictions.denoised(plan.prediction_type, x, out, sigma))
    hist = history.push(state, d)
    return x + history.weighted(row.coef, "c", hist), hist


SAMPLER = Sampler("lms", "LMSDiscreteScheduler", plan, step, initial_state, karras=True)
