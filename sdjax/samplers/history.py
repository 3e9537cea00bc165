"""The last few converted model outputs a multistep sampler keeps (DPM-Solver++, UniPC, DEIS, LMS), newest first,
and the step-order rule diffusers' multistep schedulers share. Solver weights are computed on the host, so a
multistep step inside the scan is a weighted sum."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from sdjax.samplers.plan import SamplerPlan, build
from sdjax.samplers.sigmas import vp_scales


def empty(size: int, x: jnp.ndarray) -> jnp.ndarray:
    """A history of ``size`` outputs shaped like ``x``: (size, B, H, W, C), zeros."""
    return jnp.zeros((size,) + x.shape, x.dtype)


def push(history: jnp.ndarray, value: jnp.ndarray) -> jnp.ndarray:
    """``value`` becomes the newest entry; the oldest falls out."""
    return jnp.concatenate([value[None], history[:-1]])


def weighted(coef: dict, prefix: str, history: jnp.ndarray) -> jnp.ndarray:
    """sum_k coef[f"{prefix}{k}"] * history[k]: the row's weights on the history (newest first)."""
    return sum(coef[f"{prefix}{k}"] * history[k] for k in range(history.shape[0]))


def multistep_orders(num_steps: int, t_start: int, solver_order: int, final_first: bool, second_last: bool):
    """The order of each step from ``t_start`` as DPMSolverMultistepScheduler / DEISMultistepScheduler choose it:
    limited by the history gathered since the first step run, first order on the last step when
    ``final_first``, at most second order on the one before when ``second_last``. int (num_steps - t_start,)."""
    orders = []
    for i in range(t_start, num_steps):
        done = i - t_start
        if solver_order == 1 or done < 1 or (i == num_steps - 1 and final_first):
            orders.append(1)
        elif solver_order == 2 or done < 2 or (i == num_steps - 2 and second_last):
            orders.append(2)
        else:
            orders.append(3)
    return np.array(orders)


def lambdas(sigmas: np.ndarray) -> np.ndarray:
    """Half-log-SNR lambda = log(alpha_t / sigma_t) = -log(sigma) of VE levels (+inf at sigma = 0), float64."""
    with np.errstate(divide="ignore"):
        return -np.log(np.asarray(sigmas, np.float64))


def multistep_plan(
    ts: np.ndarray, sigmas: np.ndarray, steps: np.ndarray, weights: list[dict], size: int
) -> SamplerPlan:
    """The plan of a multistep solver on the VP sample: one row per step in ``steps`` (indices into ``ts`` and
    ``sigmas``), its host-side ``weights`` (one dict per step), rows "alpha_s" and "sigma_s" to read the model
    output at the step's level, and a history of ``size`` outputs."""
    rows = {k: [w[k] for w in weights] for k in weights[0]}
    alpha_s, sigma_s = vp_scales(sigmas[steps])
    rows |= {"alpha_s": alpha_s, "sigma_s": sigma_s}
    return build(ts[steps], 1.0, alpha_s, sigma_s, rows, {"history": size})
