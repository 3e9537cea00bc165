"""Every sampler against the closed-form Gaussian-data denoiser, and the stochastic samplers' reproducibility.

Data x0 ~ N(MU, S^2) elementwise has the exact denoiser E[eps | x_t] = sqrt(1-a)(x_t - sqrt(a) MU) / (a S^2 + 1 - a).
With it an ODE/SDE sampler turns N(0, 1) noise into (nearly) N(MU, S^2) samples (2,048 x 64 values). The
consistency samplers (LCM, TCD) return posterior means, not samples: their exact output moments for the plan are
computed in closed form (every step is linear-Gaussian with this denoiser).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax import samplers, schedule
from sdjax.samplers.lcm import boundary_scalings
from sdjax.schedule import ScheduleConfig

MU, S = 0.5, 0.3
STATS_SHAPE = (2048, 8, 8, 1)
MEAN_TOL, VAR_TOL = 0.004, 0.0075  # measured worst: 0.0017 and 0.0057 (discretization bias of DDPM at 500 steps)
END_AT_ALPHA_0 = ("ddim", "pndm", "deis")  # samplers that stop at alphas_cumprod[0] (sigma(t = 0)), not at 0


def _oracle(cfg: ScheduleConfig):
    """The Bayes-optimal model for Gaussian data; fractional timesteps use log-sigma interpolation."""
    log_sigmas = jnp.log(schedule.sigmas_from_alphas_cumprod(schedule.alphas_cumprod(cfg)))
    grid = jnp.arange(cfg.num_train_timesteps, dtype=jnp.float32)

    def model_fn(x, t):
        a = 1 / (1 + jnp.exp(2 * jnp.interp(t, grid, log_sigmas)))
        eps = jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * MU) / (a * S**2 + 1 - a)
        x0 = (x - jnp.sqrt(1 - a) * eps) / jnp.sqrt(a)
        return {"epsilon": eps, "v_prediction": jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0, "sample": x0}[
            cfg.prediction_type
        ]

    return model_fn


def _expected_moments(plan: samplers.SamplerPlan, cfg: ScheduleConfig, stochastic: bool):
    """Mean and variance the exact sampler would give from this plan's start and end noise levels.

    ddim/pndm/deis stop at alphas_cumprod[0], the others at the data. A deterministic sampler also carries over
    that x_T ~ N(0, 1) misses the data mean sqrt(a_T) MU at its first level a_T (the leading-spacing flaw of Lin
    et al. 2023).
    """
    a_end = float(schedule.alphas_cumprod(cfg)[0]) if plan.name in END_AT_ALPHA_0 else 1.0
    mean, var = np.sqrt(a_end) * MU, a_end * S**2 + 1 - a_end
    if stochastic:
        return mean, var
    x0_scale, noise_scale = plan.x0_scale[0], plan.noise_scale[0]
    a_start = x0_scale**2 / (x0_scale**2 + noise_scale**2)  # the VP level of either form
    std_start = np.sqrt(a_start * S**2 + 1 - a_start)
    return mean - np.sqrt(var) * np.sqrt(a_start) * MU / std_start, var / std_start**2


def _consistency_moments(plan: samplers.SamplerPlan, cfg: ScheduleConfig, gamma: float):
    """Exact output mean and variance of LCM (gamma None) or TCD from x_T ~ N(0, 1) with the oracle: x0_hat is
    linear in x_t, and each step maps (mean, var) linearly plus fresh noise."""
    ac = np.asarray(schedule.alphas_cumprod(cfg), np.float64)
    mean, var = 0.0, 1.0
    for i, t in enumerate(int(t) for t in plan.timesteps):
        a = ac[t]
        gain = np.sqrt(a) * S**2 / (a * S**2 + 1 - a)  # x0_hat = MU + gain (x - sqrt(a) MU)
        x0_mean, x0_gain = MU + gain * (mean - np.sqrt(a) * MU), gain
        if gamma is None:  # LCM: c_out x0_hat + c_skip x, then noised to the next timestep
            c_skip, c_out = boundary_scalings(cfg, t)
            d_mean, d_gain = c_out * x0_mean + c_skip * mean, c_out * x0_gain + c_skip
            scale, noise_std = plan.row("scale")[i], plan.row("noise_std")[i]
        else:  # TCD: x_s = sqrt(a_s) x0_hat + sqrt(1 - a_s) eps_hat, then noised up to t_next
            t_next = plan.row("t_next")[i]
            a_s = ac[int(np.floor((1 - gamma) * t_next))]
            e_mean = (mean - np.sqrt(a) * x0_mean) / np.sqrt(1 - a)  # eps_hat = (x - sqrt(a) x0_hat) / sqrt(1-a)
            e_gain = (1.0 - np.sqrt(a) * x0_gain) / np.sqrt(1 - a)
            d_mean = np.sqrt(a_s) * x0_mean + np.sqrt(1 - a_s) * e_mean
            d_gain = np.sqrt(a_s) * x0_gain + np.sqrt(1 - a_s) * e_gain
            last = plan.row("last")[i] > 0 or gamma == 0
            ratio = 1.0 if last else plan.row("alpha_next")[i] / a_s
            scale, noise_std = np.sqrt(ratio), np.sqrt(1 - ratio)
        mean, var = scale * d_mean, scale**2 * d_gain**2 * var + noise_std**2
    return mean, var


STOCHASTIC = ("ddpm", "euler_ancestral", "dpm2_ancestral", "dpmpp_sde", "dpmpp_2m_sde")
# Fewer steps where they are accurate enough: DPM++ SDE's Brownian tree costs 2 x 24 draws per evaluation.
STEPS = {"dpmpp_sde": 20, "dpm2_ancestral": 250, "dpmpp_2m_sde": 250}
TRAILING = {"timestep_spacing": "trailing"}  # an SDE run from a level below sigma_max cannot forget x_T's mismatch


@pytest.mark.parametrize(
    "name, karras, eta, prediction_type, config",
    [
        ("ddim", False, 0.0, "epsilon", {}),
        ("ddim", False, 1.0, "epsilon", {}),
        ("ddpm", False, 0.0, "epsilon", {}),
        ("pndm", False, 0.0, "epsilon", {}),
        ("euler", False, 0.0, "epsilon", {}),
        ("euler", True, 0.0, "epsilon", {}),
        ("euler_ancestral", False, 0.0, "epsilon", {}),
        ("euler_ancestral", True, 0.0, "epsilon", {}),
        ("dpmpp_2m", False, 0.0, "epsilon", {}),
        ("dpmpp_2m", True, 0.0, "epsilon", {}),
        ("heun", False, 0.0, "epsilon", {}),
        ("heun", True, 0.0, "epsilon", {}),
        ("ddpm", False, 0.0, "v_prediction", {}),
        ("pndm", False, 0.0, "v_prediction", {}),
        ("dpmpp_2m", True, 0.0, "epsilon", {"solver_order": 3}),
        ("unipc", False, 0.0, "epsilon", {}),
        ("lms", False, 0.0, "epsilon", {}),
        ("deis", False, 0.0, "epsilon", {}),
        ("dpm2", False, 0.0, "epsilon", {}),
        ("dpm2_ancestral", False, 0.0, "epsilon", {}),
        ("dpm2_ancestral", True, 0.0, "v_prediction", {}),
        ("dpmpp_sde", True, 0.0, "v_prediction", {}),
        pytest.param("dpmpp_sde", True, 0.0, "epsilon", {}, marks=pytest.mark.slow),
        ("dpmpp_2m_sde", False, 0.0, "epsilon", TRAILING),
        ("dpmpp_2m_sde", True, 0.0, "v_prediction", {"solver_order": 3}),
    ],
)
def test_samplers_reproduce_gaussian_data_moments(name, karras, eta, prediction_type, config):
    # Other prediction types go through the same conversions, checked against diffusers in test_samplers.py.
    cfg = ScheduleConfig(prediction_type=prediction_type).updated(config)
    stochastic = name in STOCHASTIC or eta > 0
    steps = STEPS.get(name, 500 if stochastic else 250)
    plan = samplers.make_plan(cfg, name, steps, use_karras_sigmas=karras)
    noise = jax.random.normal(jax.random.key(1), STATS_SHAPE)
    x = samplers.sample(plan, _oracle(cfg), samplers.initial_latents(plan, noise), jax.random.key(2), eta=eta)
    x = np.asarray(x, np.float64)
    mean, var = _expected_moments(plan, cfg, stochastic)
    assert abs(x.mean() - mean) < MEAN_TOL
    assert abs(x.var() - var) < VAR_TOL


@pytest.mark.parametrize(
    "name, steps, gamma",
    [("lcm", 4, None), ("lcm", 8, None), ("tcd", 4, 0.0), ("tcd", 4, 0.3), ("tcd", 8, 1.0)],
)
def test_consistency_samplers_reproduce_their_exact_moments(name, steps, gamma):
    cfg = ScheduleConfig()
    plan = samplers.make_plan(cfg, name, steps)
    noise = jax.random.normal(jax.random.key(1), STATS_SHAPE)
    eta = 0.0 if gamma is None else gamma
    x = np.asarray(samplers.sample(plan, _oracle(cfg), noise, jax.random.key(2), eta=eta), np.float64)
    mean, var = _consistency_moments(plan, cfg, gamma)
    assert abs(x.mean() - mean) < MEAN_TOL
    assert abs(x.var() - var) < VAR_TOL
    assert var < S**2  # a consistency sampler with the exact denoiser returns posterior means: less spread


# ------------------------------------------------------------------------------------------------ reproducibility

NOISY = [name for name, record in samplers.REGISTRY.items() if record.noise != "none"]


@functools.cache
def _runner(name: str):
    """Four steps of ``name`` on (3, 8, 8, 4) latents, compiled once, as a function of the (3,) image keys."""
    cfg = ScheduleConfig()
    plan = samplers.make_plan(cfg, name, 4)
    x = samplers.initial_latents(plan, jnp.ones((3, 8, 8, 4)))
    return jax.jit(lambda keys: samplers.sample(plan, _oracle(cfg), x, keys, eta=0.5))


def _run(name: str, keys: jax.Array) -> np.ndarray:
    return np.asarray(_runner(name)(keys))


@pytest.mark.parametrize("name", NOISY)
def test_stochastic_samplers_are_reproducible_per_image_key(name):
    k0, k1, k2 = (jax.random.fold_in(jax.random.key(7), i) for i in range(3))
    first = _run(name, jnp.stack([k0, k1, k2]))
    np.testing.assert_array_equal(first, _run(name, jnp.stack([k0, k1, k2])))  # same seed, same images
    swapped = _run(name, jnp.stack([k2, k1, k0]))  # an image's noise follows its key, not its batch slot
    np.testing.assert_allclose(swapped[::-1], first, rtol=0, atol=1e-6)
    other = _run(name, jnp.stack([k0, k2, k1]))
    assert np.abs(other[1] - first[1]).max() > 1e-3  # another key, other noise
