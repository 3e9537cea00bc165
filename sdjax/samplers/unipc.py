"""UniPC: Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
Models", arXiv:2302.04867: the multistep predictor UniP (Algorithm 2) and, once the model has been evaluated at
the predicted point, the corrector UniC (Algorithm 1) that refines it, both in data prediction with B(h) =
expm1(h) ("bh2", the default) or h ("bh1"); diffusers ``UniPCMultistepScheduler``.

At evaluation i the corrector first rewrites the previous step's prediction x_i with the new x0 prediction m_i,
then the predictor steps to the next level. Both are linear in the samples and the x0 predictions; their weights
(the rho solving Zhao et al.'s order conditions) are computed on the host, per row.
"""

from __future__ import annotations

import numpy as np

from sdjax import predictions
from sdjax.samplers import history, spacing
from sdjax.samplers.record import Sampler
from sdjax.samplers.sigmas import vp_scales

_MAX_ORDER = 3


def _phis(h: float, order: int, solver_type: str) -> tuple[float, float, np.ndarray]:
    """(h_phi_1, B(h), b) of UniPC's order conditions, as diffusers builds them (hh = -h: data prediction)."""
    hh = -h
    h_phi_1 = np.expm1(hh)
    b_h = hh if solver_type == "bh1" else np.expm1(hh)
    h_phi_k, factorial, b = h_phi_1 / hh - 1, 1, []
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return h_phi_1, b_h, np.array(b)


def _weights(lam: np.ndarray, alpha_t: float, order: int, solver_type: str, corrector: bool):
    """UniP (``corrector`` False) or UniC weights on the x0 predictions: (w_new, w (3,) on m_s0, m_s1, m_s2).

    lam: lambda at (t, s0, s1, s2): t the level stepped to, s0 the level of the sample stepped from, s1, s2 older
    levels; w_new weighs the prediction at t (UniC only). The update is (sigma_t / sigma_s0) x + w . m + w_new m_t.
    """
    h = lam[0] - lam[1]
    h_phi_1, b_h, b = _phis(h, order, solver_type)
    rks = [(lam[1 + k] - lam[1]) / h for k in range(1, order)]
    R = np.stack([np.array(rks + [1.0]) ** j for j in range(order)])
    if corrector:
        rhos = [0.5] if order == 1 else np.linalg.solve(R, b)
    else:
        rhos = [] if order == 1 else [0.5] if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1])
    w = np.zeros(_MAX_ORDER)
    w[0] = -alpha_t * h_phi_1
    for k, r in enumerate(rks, start=1):  # the divided differences D1_k = (m_sk - m_s0) / r_k
        coef = -alpha_t * b_h * rhos[k - 1] / r
        w[k] += coef
        w[0] -= coef
    w_new = -alpha_t * b_h * rhos[-1] if corrector else 0.0
    w[0] -= w_new  # D1_t = m_t - m_s0
    return w_new, w


def _row(sigmas: np.ndarray, i: int, p_order: int, c_order: int, solver_type: str, corrector_on: bool) -> dict:
    """Step i's weights: UniC from level i - 1 to i (identity when off), then UniP from i to i + 1."""
    lam = history.lambdas(sigmas)
    alpha, sigma = vp_scales(sigmas)
    at = lambda *ks: lam[np.maximum(ks, 0)]  # noqa: E731
    row = {"corr_x": 1.0, "corr_last": 0.0, "corr_new": 0.0, **{f"corr_h{k}": 0.0 for k in range(_MAX_ORDER)}}
    if corrector_on:
        w_new, w = _weights(at(i, i - 1, i - 2, i - 3), alpha[i], c_order, solver_type, True)
        row = {"corr_x": 0.0, "corr_last": sigma[i] / sigma[i - 1], "corr_new": w_new}
        row |= {f"corr_h{k}": w[k] for k in range(_MAX_ORDER)}
    _, w = _weights(at(i + 1, i, i - 1, i - 2), alpha[i + 1], p_order, solver_type, False)
    return row | {"pred_x": sigma[i + 1] / sigma[i]} | {f"pred_m{k}": w[k] for k in range(_MAX_ORDER)}


def plan(cfg, ac, num_steps, t_start, karras):
    if not cfg.lower_order_final and cfg.solver_order > 1 and cfg.final_sigmas_type == "zero":
        raise ValueError(
            "unipc with lower_order_final=false needs final_sigmas_type='sigma_min': a higher-order last step to "
            "sigma 0 is undefined (diffusers' UniPCMultistepScheduler fails on it too)"
        )
    final = spacing.final_sigma(cfg, ac)
    karras_final = "last" if cfg.final_sigmas_type == "sigma_min" else None
    ts, sigmas = spacing.multistep_sigmas(ac, cfg, num_steps, karras, True, final, karras_final)
    i = np.arange(t_start, num_steps)
    cap = np.minimum(cfg.solver_order, num_steps - i) if cfg.lower_order_final else np.full(len(i), cfg.solver_order)
    orders = np.minimum(cap, i - t_start + 1)  # this_order: limited by the history gathered since t_start
    sigmas64 = sigmas.astype(np.float64)
    weights = [
        _row(sigmas64, step, orders[j], orders[j - 1], cfg.solver_type, j > 0 and step - 1 not in cfg.disable_corrector)
        for j, step in enumerate(i)
    ]
    return history.multistep_plan(ts, sigmas, i, weights, cfg.solver_order)


def initial_state(plan, x):
    # The last x0 predictions (newest first) and the previous step's corrected sample.
    return history.empty(plan.constant("history"), x), x


def step(plan, x, state, out, row, noise, eta):
    hist, last = state
    c = row.coef
    m, _ = predictions.x0_and_eps(plan.prediction_type, x, out, c["alpha_s"], c["sigma_s"])
    # UniC on the previous step's prediction (identity on the first row and where disable_corrector says).
    x = c["corr_x"] * x + c["corr_last"] * last + c["corr_new"] * m + history.weighted(c, "corr_h", hist)
    hist = history.push(hist, m)
    x_next = c["pred_x"] * x + history.weighted(c, "pred_m", hist)  # UniP
    return x_next, (hist, x)


SAMPLER = Sampler("unipc", "UniPCMultistepScheduler", plan, step, initial_state, karras=True, finite_sigma_max=True)
