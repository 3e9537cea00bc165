"""Noise levels in the variance-preserving form x = sqrt(a) x0 + sqrt(1 - a) eps, a = ``alphas_cumprod[t]``: the
parameterisation of DDIM, DDPM, PNDM, LCM and TCD, and the helpers they share."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from sdjax import predictions


def alpha_at(ac: np.ndarray, t: np.ndarray, final: float) -> np.ndarray:
    """alphas_cumprod[t], with ``final`` where t < 0 (past the end of the chain). Host side."""
    t = np.asarray(t, np.int64)
    return np.where(t >= 0, ac[np.maximum(t, 0)], np.float32(final))


def x0_and_eps(prediction_type: str, x, out, alpha_t):
    """(x0, eps) at alphas_cumprod level ``alpha_t`` from the model output."""
    return predictions.x0_and_eps(prediction_type, x, out, alpha_t**0.5, (1 - alpha_t) ** 0.5)


def clip(clip_sample_range: float | None, x0):
    """diffusers' ``clip_sample``: x0 clamped to [-range, range] when the config asks (None: not clipped)."""
    if clip_sample_range is None:
        return x0
    return jnp.clip(x0, -clip_sample_range, clip_sample_range)
