"""Spherical linear interpolation (slerp), for walking a diffusion model's latent space.

Initial noises of a sampler are standard-normal draws: in many dimensions almost all of their mass lies near the
sphere of radius sqrt(dim), and two independent draws are nearly orthogonal. A straight line between two of them
passes well inside that sphere (its midpoint has ~0.71 of their norm), where the model has never seen an input, so
the frames in the middle come out washed out; slerp stays on the great circle through both (Shoemake 1985; White
2016, "Sampling Generative Networks"). The same walk works between two prompts' text embeddings.

    noises = slerp(jnp.linspace(0, 1, 8), noise_a, noise_b)    # (8, h, w, C) from two (h, w, C)
    images = pipe.generate(prompt, latents=noises)            # 8 frames
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Above this |cos| of the angle the two vectors are (anti)parallel and sin(theta) ~ 0: slerp falls back to lerp.
PARALLEL_DOT = 0.9995


def slerp(t: jax.typing.ArrayLike, v0: jax.typing.ArrayLike, v1: jax.typing.ArrayLike) -> jax.Array:
    """Spherical linear interpolation between two arrays of the same shape, each taken as one flat vector.

        slerp(t, v0, v1) = sin((1 - t) theta) / sin(theta) * v0 + sin(t theta) / sin(theta) * v1

    with theta the angle between v0 and v1. t = 0 gives v0 and t = 1 gives v1; for orthogonal v0, v1 of equal norm
    r every point has norm r, and t = 1/2 is (v0 + v1) / sqrt(2). Where v0 and v1 are (anti)parallel
    (|cos theta| > PARALLEL_DOT) the arc is undefined or numerically unstable, and this is linear interpolation
    (1 - t) v0 + t v1.

    Args:
      t: a scalar or an array of T fractions (any real values; [0, 1] interpolates, outside extrapolates).
      v0, v1: arrays of one shape S (e.g. noise (h, w, C) NHWC without the batch, or embeddings (77, D)); any float
        dtype; neither may be all zeros.
    Returns:
      float32 array of shape t.shape + S: one interpolant per entry of t.
    """
    v0, v1 = jnp.asarray(v0, jnp.float32), jnp.asarray(v1, jnp.float32)
    if v0.shape != v1.shape:
        raise ValueError(f"slerp needs v0 and v1 of one shape, got {v0.shape} and {v1.shape}")
    t = jnp.asarray(t, jnp.float32)
    t_ = t.reshape(t.shape + (1,) * v0.ndim)
    dot = jnp.vdot(v0, v1) / (jnp.linalg.norm(v0) * jnp.linalg.norm(v1))
    theta = jnp.arccos(jnp.clip(dot, -1.0, 1.0))
    parallel = jnp.abs(dot) > PARALLEL_DOT
    sin_theta = jnp.where(parallel, 1.0, jnp.sin(theta))  # kept off zero so the unused branch stays finite
    arc = (jnp.sin((1 - t_) * theta) * v0 + jnp.sin(t_ * theta) * v1) / sin_theta
    return jnp.where(parallel, (1 - t_) * v0 + t_ * v1, arc)
