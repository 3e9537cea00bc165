"""DDIM: Song et al. 2021, "Denoising Diffusion Implicit Models", arXiv:2010.02502, eq. 12, with eta (sigma_t =
eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))); diffusers ``DDIMScheduler``."""

from __future__ import annotations

from sdjax import schedule
from sdjax.samplers import alphas
from sdjax.samplers.noise import is_zero
from sdjax.samplers.plan import build, vp_levels
from sdjax.samplers.record import Sampler, no_state


def plan(cfg, ac, num_steps, t_start, karras):
    ts = schedule.inference_timesteps(cfg, num_steps)[t_start:]
    final = 1.0 if cfg.set_alpha_to_one else ac[0]
    # DDIM steps back a fixed T // N even when the spacing is not uniform, as diffusers does.
    a_prev = alphas.alpha_at(ac, ts - cfg.num_train_timesteps // num_steps, final)
    return build(ts, 1.0, *vp_levels(ac[ts]), {"alpha_t": ac[ts], "alpha_prev": a_prev})


def step(plan, x, state, out, row, noise, eta):
    a_t, a_prev = row.coef["alpha_t"], row.coef["alpha_prev"]
    x0, eps = alphas.x0_and_eps(plan.prediction_type, x, out, a_t)
    x0 = alphas.clip(plan.clip_sample_range, x0)
    variance = ((1 - a_prev) / (1 - a_t)) * (1 - a_t / a_prev)
    std = eta * variance**0.5
    x_prev = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
    return (x_prev if is_zero(eta) else x_prev + std * noise.normal()), state


SAMPLER = Sampler("ddim", "DDIMScheduler", plan, step, no_state, noise="eta")
