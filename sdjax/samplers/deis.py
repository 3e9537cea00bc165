"""DEIS: Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator", arXiv:2204.13902,
the multistep exponential integrator with polynomial extrapolation of eps in log-rho (rho = sigma / alpha, the
"logrho" solver); diffusers ``DEISMultistepScheduler`` (orders 1-3, default 2).

Every step is linear in the sample and the last eps predictions: x_t = c_x x_s + sum_k c_mk eps_{s-k}, with the
weights integrated on the host, per row, as diffusers' ``ind_fn``.
"""

from __future__ import annotations

import numpy as np

from sdjax import predictions
from sdjax.samplers import history, spacing
from sdjax.samplers.record import Sampler
from sdjax.samplers.sigmas import all_sigmas, vp_scales


def _second(t, b, c):
    return t * (-np.log(c) + np.log(t) - 1) / (np.log(b) - np.log(c))


def _third(t, b, c, d):
    lt, lb, lc, ld = np.log(t), np.log(b), np.log(c), np.log(d)
    return t * (lc * (ld - lt + 1) - ld * lt + ld + lt**2 - 2 * lt + 2) / ((lb - lc) * (lb - ld))


def _row_weights(sigmas, i: int, order: int) -> dict[str, float]:
    """c_x and c_m0..2 of step i (sigmas[i] -> sigmas[i + 1]), diffusers' ``deis_*_order_update``."""
    alpha_t, sigma_t = vp_scales(sigmas[i + 1])
    alpha_s, sigma_s = vp_scales(sigmas[i])
    m = np.zeros(3)
    if order == 1:
        h = np.log(alpha_t / sigma_t) - np.log(alpha_s / sigma_s)
        return {"c_x": alpha_t / alpha_s, "c_m0": -sigma_t * np.expm1(h), "c_m1": 0.0, "c_m2": 0.0}
    rho = [s for s in sigmas[[i + 1, i, i - 1, max(i - 2, 0)]]]  # sigma / alpha is the VE sigma itself
    t, s0, s1, s2 = rho
    if order == 2:
        m[0] = _second(t, s0, s1) - _second(s0, s0, s1)
        m[1] = _second(t, s1, s0) - _second(s0, s1, s0)
    else:
        m[0] = _third(t, s0, s1, s2) - _third(s0, s0, s1, s2)
        m[1] = _third(t, s1, s2, s0) - _third(s0, s1, s2, s0)
        m[2] = _third(t, s2, s0, s1) - _third(s0, s2, s0, s1)
    return {"c_x": alpha_t / alpha_s, **{f"c_m{k}": alpha_t * m[k] for k in range(3)}}


def plan(cfg, ac, num_steps, t_start, karras):
    # DEIS lands on sigma(t = 0), not 0 (Karras: on the ramp's last level, the same for two steps or more).
    ts, sigmas = spacing.multistep_sigmas(ac, cfg, num_steps, karras, True, all_sigmas(ac[:1])[0], "last")
    second_last = final_first = cfg.lower_order_final and num_steps < 15
    orders = history.multistep_orders(num_steps, t_start, cfg.solver_order, final_first, second_last)
    i = np.arange(t_start, num_steps)
    sigmas64 = sigmas.astype(np.float64)
    weights = [_row_weights(sigmas64, j, o) for j, o in zip(i, orders, strict=True)]
    return history.multistep_plan(ts, sigmas, i, weights, cfg.solver_order)


def initial_state(plan, x):
    return history.empty(plan.constant("history"), x)  # the last eps predictions, newest first


def step(plan, x, state, out, row, noise, eta):
    c = row.coef
    x0, _ = predictions.x0_and_eps(plan.prediction_type, x, out, c["alpha_s"], c["sigma_s"])
    eps = (x - c["alpha_s"] * x0) / c["sigma_s"]  # as diffusers: through x0, whatever the prediction type
    hist = history.push(state, eps)
    return c["c_x"] * x + history.weighted(c, "c_m", hist), hist


SAMPLER = Sampler("deis", "DEISMultistepScheduler", plan, step, initial_state, karras=True)
