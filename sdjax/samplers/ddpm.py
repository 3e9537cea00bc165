"""DDPM ancestral sampling: Ho et al. 2020, "Denoising Diffusion Probabilistic Models", arXiv:2006.11239,
Algorithm 2, eqs. 6-7, with the posterior variance beta-tilde ("fixed_small"); diffusers ``DDPMScheduler``."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from sdjax import schedule
from sdjax.samplers import alphas
from sdjax.samplers.plan import build, vp_levels
from sdjax.samplers.record import Sampler, no_state


def plan(cfg, ac, num_steps, t_start, karras):
    ts_all = schedule.inference_timesteps(cfg, num_steps)
    ts = ts_all[t_start:]
    a_prev = alphas.alpha_at(ac, np.append(ts_all[1:], -1)[t_start:], 1.0)
    return build(ts, 1.0, *vp_levels(ac[ts]), {"alpha_t": ac[ts], "alpha_prev": a_prev, "add_noise": ts > 0})


def step(plan, x, state, out, row, noise, eta):
    a_t, a_prev = row.coef["alpha_t"], row.coef["alpha_prev"]
    alpha, beta = a_t / a_prev, 1 - a_t / a_prev
    x0 = alphas.clip(plan.clip_sample_range, alphas.x0_and_eps(plan.prediction_type, x, out, a_t)[0])
    mean = (a_prev**0.5 * beta / (1 - a_t)) * x0 + (alpha**0.5 * (1 - a_prev) / (1 - a_t)) * x
    variance = jnp.maximum((1 - a_prev) / (1 - a_t) * beta, 1e-20)
    return mean + row.coef["add_noise"] * variance**0.5 * noise.normal(), state


SAMPLER = Sampler("ddpm", "DDPMScheduler", plan, step, no_state, noise="always")
