"""DPM-Solver++(2M) and (3M): Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models", arXiv:2211.01095, Algorithm 2 (multistep, data prediction; ``solver_type`` midpoint or
heun) and its third-order extension (``solver_order: 3``, what A1111 and ComfyUI call DPM++ 3M); diffusers
``DPMSolverMultistepScheduler`` with ``algorithm_type="dpmsolver++"``.

Every step is linear in the sample and the last x0 predictions: x_t = c_x x_s + sum_k c_mk x0_{s-k}
(+ c_noise z for the SDE variant, ``dpmpp_2m_sde.py``); the weights are computed on the host, per row.
"""

from __future__ import annotations

import numpy as np

from sdjax import predictions
from sdjax.samplers import history, spacing
from sdjax.samplers.record import Sampler
from sdjax.samplers.sigmas import vp_scales


def _d_vectors(order: int, h: float, lam: np.ndarray):
    """(D0, D1, D2) as weights on (m0, m1, m2): the divided differences of DPM-Solver++ (Lu et al. eq. 14-15).
    ``lam``: lambda at s0, s1, s2."""
    e = np.eye(3)
    zero = np.zeros(3)
    if order == 1:
        return e[0], zero, zero
    r0 = (lam[0] - lam[1]) / h
    d1_0 = (e[0] - e[1]) / r0
    if order == 2:
        return e[0], d1_0, zero
    r1 = (lam[1] - lam[2]) / h
    d1_1 = (e[1] - e[2]) / r1
    return e[0], d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1), (d1_0 - d1_1) / (r0 + r1)


def _row_weights(sigmas, i: int, order: int, algorithm: str, solver_type: str) -> dict[str, float]:
    """c_x, c_m0..2, c_noise of step i (from sigmas[i] to sigmas[i + 1]), as diffusers' update functions."""
    lam = history.lambdas(sigmas[[i + 1, i, max(i - 1, 0), max(i - 2, 0)]])
    (alpha_t,), (sigma_t,) = vp_scales(sigmas[i + 1 : i + 2])
    h = lam[0] - lam[1]
    d0, d1, d2 = _d_vectors(order, h, lam[1:])
    with np.errstate(divide="ignore", invalid="ignore"):
        if algorithm == "dpmsolver++":
            phi = np.expm1(-h)  # exp(-h) - 1
            c_x, c_noise = sigma_t / vp_scales(sigmas[i])[1], 0.0
            m = -alpha_t * phi * d0
            if order == 2 and solver_type == "midpoint":
                m = m - 0.5 * alpha_t * phi * d1
            elif order >= 2:
                m = m + alpha_t * (phi / h + 1.0) * d1 - alpha_t * ((phi + h) / h**2 - 0.5) * d2
        else:  # sde-dpmsolver++
            phi = -np.expm1(-2.0 * h)  # 1 - exp(-2h)
            c_x = sigma_t / vp_scales(sigmas[i])[1] * np.exp(-h)
            c_noise = sigma_t * np.sqrt(phi)
            m = alpha_t * phi * d0
            if order == 2 and solver_type == "midpoint":
                m = m + 0.5 * alpha_t * phi * d1
            elif order >= 2:
                m = (
                    m
                    + alpha_t * (phi / (-2.0 * h) + 1.0) * d1
                    + alpha_t * ((phi - 2.0 * h) / (2.0 * h) ** 2 - 0.5) * d2
                )
    return {"c_x": c_x, "c_noise": c_noise, **{f"c_m{k}": m[k] for k in range(3)}}


def plan(cfg, ac, num_steps, t_start, karras):
    """Also dpmpp_2m_sde's plan (``cfg.algorithm_type`` says which update)."""
    round_karras = cfg.beta_schedule != "squaredcos_cap_v2"
    ts, sigmas = spacing.multistep_sigmas(ac, cfg, num_steps, karras, round_karras, spacing.final_sigma(cfg, ac))
    final_first = cfg.euler_at_final or (cfg.lower_order_final and num_steps < 15) or cfg.final_sigmas_type == "zero"
    second_last = cfg.lower_order_final and num_steps < 15
    orders = history.multistep_orders(num_steps, t_start, cfg.solver_order, final_first, second_last)
    i = np.arange(t_start, num_steps)
    sigmas64 = sigmas.astype(np.float64)
    algorithm = (cfg.algorithm_type, cfg.solver_type)
    weights = [_row_weights(sigmas64, j, o, *algorithm) for j, o in zip(i, orders, strict=True)]
    return history.multistep_plan(ts, sigmas, i, weights, cfg.solver_order)


def initial_state(plan, x):
    return history.empty(plan.constant("history"), x)  # the last x0 predictions, newest first


def update(plan, x, hist, out, row):
    """The deterministic part of a step: (c_x x + sum_k c_mk x0_k, the history with this x0)."""
    c = row.coef
    x0, _ = predictions.x0_and_eps(plan.prediction_type, x, out, c["alpha_s"], c["sigma_s"])
    hist = history.push(hist, x0)
    return c["c_x"] * x + history.weighted(c, "c_m", hist), hist


def step(plan, x, state, out, row, noise, eta):
    return update(plan, x, state, out, row)


SAMPLER = Sampler(
    "dpmpp_2m",
    "DPMSolverMultistepScheduler",
    plan,
    step,
    initial_state,
    karras=True,
    pinned=(("algorithm_type", "dpmsolver++"),),
    finite_sigma_max=True,
)
