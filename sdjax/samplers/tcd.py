"""Trajectory consistency distillation: Zheng et al. 2024, "Trajectory Consistency Distillation", arXiv:2402.19159,
strategic stochastic sampling (Sec. 4.4): from t the model's x0 and eps prediction jump to s = floor((1 - gamma)
t_next) on the trajectory, then fresh noise takes the sample up to t_next (gamma = 0: deterministic, the
trajectory itself; gamma = 1: LCM-like). diffusers ``TCDScheduler``; gamma is the ``eta`` argument (diffusers'
``step(eta=...)``, which its pipelines pass from ``eta``), in [0, 1], and may change without recompiling.
Timesteps as LCM's (``lcm.consistency_timesteps``); the last step lands on s = 0's level, not exactly 0.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from sdjax.samplers import alphas
from sdjax.samplers.lcm import consistency_timesteps
from sdjax.samplers.noise import is_zero
from sdjax.samplers.plan import build, vp_levels
from sdjax.samplers.record import Sampler, no_state


def plan(cfg, ac, num_steps, t_start, karras):
    ts = consistency_timesteps(cfg, num_steps)
    i = np.arange(t_start, num_steps)
    last = i == num_steps - 1
    t_next = np.where(last, 0, ts[np.minimum(i + 1, num_steps - 1)])
    rows = {"alpha_t": ac[ts[i]], "alpha_next": ac[t_next], "t_next": t_next, "last": last}
    return build(ts[i], 1.0, *vp_levels(ac[ts[i]]), rows, {"alphas_cumprod": tuple(float(a) for a in ac)})


def step(plan, x, state, out, row, noise, eta):
    c = row.coef
    table = jnp.asarray(plan.constant("alphas_cumprod"), jnp.float32)
    alpha_s = table[jnp.floor((1 - eta) * c["t_next"]).astype(jnp.int32)]  # gamma is traced: looked up in the scan
    x0, eps = alphas.x0_and_eps(plan.prediction_type, x, out, c["alpha_t"])
    x = alpha_s**0.5 * x0 + (1 - alpha_s) ** 0.5 * eps
    if is_zero(eta):
        return x, state
    ratio = c["alpha_next"] / alpha_s
    renoise = (eta > 0) & (c["last"] == 0)
    return jnp.where(renoise, ratio**0.5 * x + (1 - ratio) ** 0.5 * noise.normal(), x), state


SAMPLER = Sampler("tcd", "TCDScheduler", plan, step, no_state, noise="eta", max_eta=1.0)
