"""Latent consistency models: Luo et al. 2023, "Latent Consistency Models: Synthesizing High-Resolution Images
with Few-Step Inference", arXiv:2310.04378 (multistep consistency sampling, Algorithm 1 of Song et al. 2023,
arXiv:2303.01469): at each step the consistency function f(x, t) = c_skip(t) x + c_out(t) x0(x, t) jumps to the
data, then fresh noise takes it to the next timestep (none after the last); diffusers ``LCMScheduler``. For
LCM-distilled UNets and LCM-LoRAs, 2-8 steps, guidance 1.0-2.0.

Timesteps skip through the distillation schedule of ``original_inference_steps`` (50) points, k = T // 50:
t in {k - 1, 2k - 1, ..., T - 1}; ``timestep_spacing`` is not read (as diffusers).
"""

from __future__ import annotations

import numpy as np

from sdjax.samplers import alphas
from sdjax.samplers.plan import build, vp_levels
from sdjax.samplers.record import Sampler, no_state

SIGMA_DATA = 0.5  # the consistency boundary condition's data std (diffusers' sigma_data)


def consistency_timesteps(cfg, num_steps: int) -> np.ndarray:
    """LCMScheduler / TCDScheduler ``set_timesteps(num_steps)``: int64 (num_steps,), descending."""
    original = cfg.original_inference_steps
    n = cfg.num_train_timesteps
    if original > n:
        raise ValueError(f"original_inference_steps ({original}) must be <= num_train_timesteps ({n})")
    if num_steps > original:
        raise ValueError(
            f"{num_steps} steps exceed the consistency schedule's original_inference_steps ({original}); use at most "
            f"{original} steps"
        )
    origin = (np.arange(1, original + 1) * (n // original) - 1)[::-1]
    return origin[np.floor(np.linspace(0, len(origin), num=num_steps, endpoint=False)).astype(np.int64)]


def boundary_scalings(cfg, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(c_skip, c_out) of the consistency parameterisation at timesteps t (Song et al. 2023, Sec. 3)."""
    scaled = np.asarray(t, np.float64) * cfg.timestep_scaling
    return SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2), scaled / np.sqrt(scaled**2 + SIGMA_DATA**2)


def plan(cfg, ac, num_steps, t_start, karras):
    ts = consistency_timesteps(cfg, num_steps)
    i = np.arange(t_start, num_steps)
    last = i == num_steps - 1
    a_prev = ac[np.where(last, ts[i], ts[np.minimum(i + 1, num_steps - 1)])].astype(np.float64)
    c_skip, c_out = boundary_scalings(cfg, ts[i])
    rows = {
        "alpha_t": ac[ts[i]],
        "c_skip": c_skip,
        "c_out": c_out,
        "scale": np.where(last, 1.0, np.sqrt(a_prev)),  # the next level's (none after the last step)
        "noise_std": np.where(last, 0.0, np.sqrt(1 - a_prev)),
    }
    return build(ts[i], 1.0, *vp_levels(ac[ts[i]]), rows)


def step(plan, x, state, out, row, noise, eta):
    c = row.coef
    x0 = alphas.clip(plan.clip_sample_range, alphas.x0_and_eps(plan.prediction_type, x, out, c["alpha_t"])[0])
    denoised = c["c_out"] * x0 + c["c_skip"] * x
    return c["scale"] * denoised + c["noise_std"] * noise.normal(), state


SAMPLER = Sampler("lcm", "LCMScheduler", plan, step, no_state, noise="always")
