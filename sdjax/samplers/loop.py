"""The denoising loop: one ``lax.scan`` over a plan's rows, the same for every sampler and task."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from sdjax.samplers import hooks as hooks_lib
from sdjax.samplers.hooks import Hooks
from sdjax.samplers.noise import StepNoise
from sdjax.samplers.plan import Row, SamplerPlan, rows
from sdjax.samplers.registry import REGISTRY

# model_fn(x_in, t, **extra) -> model output (B, H, W, C) in the config's prediction type, any float dtype.
ModelFn = Callable[..., jnp.ndarray]


def initial_latents(plan: SamplerPlan, noise: jnp.ndarray) -> jnp.ndarray:
    """x_T for txt2img: standard-normal ``noise`` (B, H, W, C) times the sampler's ``init_noise_sigma``
    (1 for the VP samplers; sqrt(sigma_max^2 + 1) or sigma_max for the sigma samplers). float32."""
    return noise.astype(jnp.float32) * jnp.float32(plan.init_noise_sigma)


def noised_latents(plan: SamplerPlan, x0: jnp.ndarray, noise: jnp.ndarray) -> jnp.ndarray:
    """img2img start: clean latents ``x0`` noised to the plan's first evaluation as diffusers' ``add_noise``.

    x0, noise: (B, H, W, C). Returns float32 (B, H, W, C).
    """
    x0, noise = x0.astype(jnp.float32), noise.astype(jnp.float32)
    return jnp.float32(plan.x0_scale[0]) * x0 + jnp.float32(plan.noise_scale[0]) * noise


def sample(
    plan: SamplerPlan,
    model_fn: ModelFn,
    x: jnp.ndarray,
    rng: jax.Array,
    *,
    eta: float | jnp.ndarray = 0.0,
    hooks: Sequence[Hooks] = (),
) -> jnp.ndarray:
    """Runs the whole denoising loop of ``plan`` as one ``lax.scan``; returns the final latents.

    x: float32 (B, H, W, C) start latents (``initial_latents`` or ``noised_latents``).
    model_fn(x_in, t, **extra) -> model output (B, H, W, C) in the config's prediction type, any float dtype;
    x_in is x scaled by the row's c_in (diffusers' ``scale_model_input``) and passed through the hooks'
    ``before_model``, t a float32 scalar timestep, extra the hooks' extra inputs.
    rng: PRNG key, or (B,) keys, one per example: evaluation i's Gaussian noise is ``fold_in(key, i)`` (see
    :mod:`sdjax.samplers.noise`). eta: the stochasticity of the "eta" samplers (DDIM's eta, TCD's gamma), may be
    traced; ignored by the others. hooks: the tasks' :class:`Hooks`, applied in order. Returns float32 (B, H, W, C).
    """
    carry = sample_steps(plan, model_fn, initial_carry(plan, x), rows(plan), rng, eta=eta, hooks=hooks)
    return carry[0]


def initial_carry(plan: SamplerPlan, x: jnp.ndarray) -> tuple[jnp.ndarray, Any]:
    """The loop's carry before the first evaluation: (x float32 (B, H, W, C), the sampler's scan state)."""
    x = x.astype(jnp.float32)
    return x, REGISTRY[plan.name].initial_state(plan, x)


def sample_steps(
    plan: SamplerPlan,
    model_fn: ModelFn,
    carry: tuple[jnp.ndarray, Any],
    plan_rows: Row,
    rng: jax.Array,
    *,
    eta: float | jnp.ndarray = 0.0,
    hooks: Sequence[Hooks] = (),
) -> tuple[jnp.ndarray, Any]:
    """Runs the evaluations ``plan_rows`` (:func:`~sdjax.samplers.plan.rows`, or a slice of it) from ``carry``
    (x, sampler state) as one ``lax.scan`` and returns the carry after them. :func:`sample` is this over every
    row; a host loop over one-row slices (a progress bar) runs the same steps. Arguments as :func:`sample`."""
    record = REGISTRY[plan.name]
    sigma_top = plan.constant("brownian_top")

    def body(carry, row):
        x, state = carry
        x_in, extra = hooks_lib.before_model(hooks, x * row.c_in, row)
        out = model_fn(x_in, row.timestep, **extra).astype(jnp.float32)
        noise = StepNoise(rng, row.index, x.shape, sigma_top)
        x, state = record.step(plan, x, state, out, row, noise, eta)
        return (hooks_lib.after_step(hooks, x, row), state), None

    carry, _ = jax.lax.scan(body, carry, plan_rows)
    return carry
