"""What the denoiser predicts, and the one set of conversions between its output and (x0, eps).

A noisy latent is x = alpha x0 + sigma eps (variance preserving: alpha^2 + sigma^2 = 1, alpha^2 =
``alphas_cumprod[t]``). The UNet outputs, by its scheduler config's ``prediction_type``:

  epsilon        eps                                  Ho et al. 2020
  v_prediction   v = alpha eps - sigma x0             Salimans & Ho 2022, arXiv:2202.00512, Sec. 4
  sample         x0

Samplers turn the output into (x0, eps) (:func:`x0_and_eps`, or :func:`denoised` for the variance-exploding
x = x0 + sigma eps of the Karras-style samplers); training turns (x0, eps) into the target
(:func:`model_target`). All of it is elementwise and works on any broadcastable float arrays.
"""

from __future__ import annotations

import jax.numpy as jnp

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def check_prediction_type(prediction_type: str) -> None:
    """ValueError naming the accepted values for an unknown ``prediction_type``."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; accepted: {', '.join(PREDICTION_TYPES)}")


def x0_and_eps(prediction_type: str, x, out, alpha, sigma):
    """(x0, eps) from the model output ``out`` at the VP sample x = alpha x0 + sigma eps."""
    if prediction_type == "epsilon":
        return (x - sigma * out) / alpha, out
    if prediction_type == "v_prediction":
        return alpha * x - sigma * out, alpha * out + sigma * x
    return out, (x - alpha * out) / sigma


def denoised(prediction_type: str, x, out, sigma):
    """x0 from the model output for the VE sample x = x0 + sigma eps, whose VP form x / sqrt(sigma^2 + 1) the
    model was given (Karras et al. 2022, arXiv:2206.00364, Table 1 preconditioning)."""
    if prediction_type == "epsilon":
        return x - sigma * out
    if prediction_type == "v_prediction":
        return out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
    return out


def model_target(prediction_type: str, x0, eps, alpha, sigma):
    """What the model learns to output at x = alpha x0 + sigma eps: eps, v = alpha eps - sigma x0, or x0.
    Float32."""
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return eps.astype(jnp.float32)
    if prediction_type == "v_prediction":
        return alpha * eps.astype(jnp.float32) - sigma * x0.astype(jnp.float32)
    return x0.astype(jnp.float32)
