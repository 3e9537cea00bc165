"""PLMS, the pseudo linear multistep method of Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models
on Manifolds", arXiv:2202.09778 (eq. 12: Adams-Bashforth on the last four model outputs, eq. 11: the transfer
phi), with a Heun-style start; diffusers ``PNDMScheduler(skip_prk_steps=True)``."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from sdjax.samplers import alphas, spacing
from sdjax.samplers.plan import build, vp_levels
from sdjax.samplers.record import Sampler

# Adams-Bashforth weights on (newest, ..., oldest) model outputs by evaluation: 0 is the first Euler step, 1 its
# Heun-style correction (averaging the two slopes), 2-4 the linear multistep orders 2-4 (Liu et al. eq. 12).
_WEIGHTS = np.array(
    [
        (1.0, 0.0, 0.0, 0.0),
        (0.5, 0.5, 0.0, 0.0),
        (3 / 2, -1 / 2, 0.0, 0.0),
        (23 / 12, -16 / 12, 5 / 12, 0.0),
        (55 / 24, -59 / 24, 37 / 24, -9 / 24),
    ]
)


def plan(cfg, ac, num_steps, t_start, karras):
    ts = spacing.plms_timesteps(cfg, num_steps)[t_start:]
    ratio = cfg.num_train_timesteps // num_steps
    counter = np.arange(len(ts))
    # Evaluation 1 re-does step 0 with the averaged slope: it steps from ts[1] + ratio to ts[1].
    t_cur = np.where(counter == 1, ts + ratio, ts)
    t_prev = np.where(counter == 1, ts, ts - ratio)
    final = 1.0 if cfg.set_alpha_to_one else ac[0]
    weights = _WEIGHTS[np.minimum(counter, 4)]
    rows = {"alpha_t": ac[t_cur], "alpha_prev": alphas.alpha_at(ac, t_prev, final), "first": counter == 0}
    rows |= {"restart": counter == 1} | {f"w{k}": weights[:, k] for k in range(4)}
    return build(ts, 1.0, *vp_levels(ac[ts]), rows)


def _transfer(prediction_type, x, eps, a_t, a_prev):
    """PNDM's transfer phi(x, eps, t -> t_prev) (Liu et al. eq. 11), the DDIM step written with eps only."""
    if prediction_type == "v_prediction":
        eps = alphas.x0_and_eps(prediction_type, x, eps, a_t)[1]
    denom = a_t * (1 - a_prev) ** 0.5 + (a_t * (1 - a_t) * a_prev) ** 0.5
    return (a_prev / a_t) ** 0.5 * x - (a_prev - a_t) * eps / denom


def initial_state(plan, x):
    return jnp.zeros((3,) + x.shape, x.dtype), jnp.zeros_like(x)  # last 3 model outputs (newest first), x_first


def step(plan, x, state, out, row, noise, eta):
    ets, x_first = state
    c = row.coef
    eps = c["w0"] * out + c["w1"] * ets[0] + c["w2"] * ets[1] + c["w3"] * ets[2]
    restart = c["restart"] > 0
    x = jnp.where(restart, x_first, x)  # the correction restarts from the first step's sample
    x_first = jnp.where(c["first"] > 0, x, x_first)
    ets = jnp.where(restart, ets, jnp.concatenate([out[None], ets[:-1]]))
    return _transfer(plan.prediction_type, x, eps, c["alpha_t"], c["alpha_prev"]), (ets, x_first)


SAMPLER = Sampler("pndm", "PNDMScheduler", plan, step, initial_state, prediction_types=("epsilon", "v_prediction"))
