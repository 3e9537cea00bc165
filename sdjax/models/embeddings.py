"""Timestep embeddings of the SD UNet and ControlNet: sinusoidal features, then a two-layer MLP (diffusers'
``Timesteps`` / ``get_timestep_embedding`` and ``TimestepEmbedding``)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from sdjax.models.layers import Dense

Dtype = jnp.dtype


def get_timestep_embedding(
    timesteps: jax.Array, embedding_dim: int, flip_sin_to_cos: bool, freq_shift: float, max_period: float = 10000.0
) -> jax.Array:
    """Sinusoidal embedding of (B,) timesteps (int or float) -> (B, embedding_dim) float32, as diffusers'
    ``get_timestep_embedding`` (DDPM, Ho et al. 2020): frequencies ``max_period ** (-i / (half - freq_shift))``."""
    half = embedding_dim // 2
    # Frequencies are compile-time constants, rounded to float32 at each step as torch does.
    exponent = np.arange(half, dtype=np.float32) * np.float32(-math.log(max_period)) / np.float32(half - freq_shift)
    freqs = np.exp(exponent)
    args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
    sin_cos = [jnp.cos(args), jnp.sin(args)] if flip_sin_to_cos else [jnp.sin(args), jnp.cos(args)]
    emb = jnp.concatenate(sin_cos, axis=-1)
    if embedding_dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """diffusers ``TimestepEmbedding``: linear_1, SiLU, linear_2. (B, Cin) -> (B, time_embed_dim)."""

    time_embed_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = Dense(self.time_embed_dim, dtype=self.dtype, name="linear_1")(x)
        return Dense(self.time_embed_dim, dtype=self.dtype, name="linear_2")(nn.swish(x))
