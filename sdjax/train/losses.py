"""Training objectives: the VAE's reconstruction + KL loss (stage 1) and the denoising loss (stage 2).

Pure functions of arrays; the randomness (posterior samples, noise, timesteps) is drawn by the train step and
passed in, so every loss here is deterministic and testable on its own. Everything is computed in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sdjax import predictions, schedule

RECONSTRUCTION_LOSSES = ("l1", "l2")


def _per_example_mean(x: jax.Array) -> jax.Array:
    return jnp.mean(x.astype(jnp.float32), axis=tuple(range(1, x.ndim)))


def reconstruction_loss(images: jax.Array, reconstructions: jax.Array, kind: str = "l1") -> jax.Array:
    """Mean absolute ("l1") or squared ("l2") error per example.

    images, reconstructions: (B, H, W, 3) in [-1, 1], any float dtype. Returns float32 (B,).
    """
    if kind not in RECONSTRUCTION_LOSSES:
        raise ValueError(f"unknown reconstruction loss {kind!r}; accepted: {', '.join(RECONSTRUCTION_LOSSES)}")
    diff = images.astype(jnp.float32) - reconstructions.astype(jnp.float32)
    return _per_example_mean(jnp.abs(diff) if kind == "l1" else jnp.square(diff))


def psnr(images: jax.Array, reconstructions: jax.Array) -> jax.Array:
    """Peak signal-to-noise ratio in dB per example, on images mapped from [-1, 1] to [0, 1] (reconstructions
    clipped to the valid range first). images, reconstructions: (B, H, W, 3). Returns float32 (B,)."""
    x = images.astype(jnp.float32) / 2 + 0.5
    y = jnp.clip(reconstructions.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
    mse = _per_example_mean(jnp.square(x - y))
    return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))  # the floor keeps identical images finite (100 dB)


def vae_loss(
    images: jax.Array, reconstructions: jax.Array, kl: jax.Array, *, kind: str = "l1", kl_weight: float = 1e-6
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Stage-1 objective (Rombach et al. 2022, Sec. 3): reconstruction + kl_weight * KL(q(z|x) || N(0, I)).

    images, reconstructions: (B, H, W, 3) in [-1, 1]; kl: (B,) per-example KL summed over latent dimensions
    (``posterior.kl()``). Returns (float32 scalar loss, metrics dict of float32 scalars: loss, reconstruction,
    kl, psnr).
    """
    rec = reconstruction_loss(images, reconstructions, kind)
    loss = jnp.mean(rec + kl_weight * kl.astype(jnp.float32))
    metrics = {
        "loss": loss,
        "reconstruction": jnp.mean(rec),
        "kl": jnp.mean(kl),
        "psnr": jnp.mean(psnr(images, reconstructions)),
    }
    return loss, metrics


def offset_noise(noise: jax.Array, offset: jax.Array, strength: float) -> jax.Array:
    """Offset noise (Guttenberg 2023, "Diffusion with Offset Noise"), as diffusers' ``--noise_offset``.

    Adds a per-example, per-channel constant so the model learns to change an image's mean brightness.
    noise: (B, H, W, C); offset: standard normal (B, C). Returns float32 (B, H, W, C).
    """
    return noise.astype(jnp.float32) + strength * offset.astype(jnp.float32)[:, None, None, :]


def diffusion_target(
    alphas_cumprod: jax.Array, latents: jax.Array, noise: jax.Array, timesteps: jax.Array, prediction_type: str
) -> jax.Array:
    """What the UNet learns to predict at noisy latents ``add_noise(latents, noise, t)``: the noise ("epsilon"),
    the velocity ("v_prediction", Salimans & Ho 2022) or the clean latents ("sample").

    alphas_cumprod: float32 (T,); latents, noise: (B, h, w, C); timesteps: int (B,). Returns float32 (B, h, w, C).
    """
    a = schedule.alphas_at(alphas_cumprod, timesteps, latents.ndim)
    return predictions.model_target(prediction_type, latents, noise, a**0.5, (1 - a) ** 0.5)


def min_snr_weights(snr: jax.Array, gamma: float | None, prediction_type: str) -> jax.Array:
    """Min-SNR-gamma loss weights (Hang et al. 2023, arXiv:2303.09556), as diffusers' training scripts.

    The weight on the x0-error is min(SNR, gamma); expressed on the model's target that is min(SNR, gamma) / SNR
    for epsilon, / (SNR + 1) for v-prediction, and unchanged for sample prediction. ``gamma=None`` gives 1.
    snr: float32 (B,). Returns float32 (B,).
    """
    predictions.check_prediction_type(prediction_type)
    if gamma is None:
        return jnp.ones_like(snr, dtype=jnp.float32)
    if prediction_type == "epsilon":
        # min(1, gamma / snr) == min(snr, gamma) / snr, and stays 1 (not NaN) at a zero-terminal-SNR step.
        return jnp.minimum(1.0, gamma / snr)
    if prediction_type == "v_prediction":
        return jnp.minimum(snr, gamma) / (snr + 1.0)
    return jnp.minimum(snr, gamma)  # sample prediction


def diffusion_loss(
    prediction: jax.Array, target: jax.Array, weights: jax.Array | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted mean squared error between the UNet output and its target (Ho et al. 2020, eq. 14).

    prediction, target: (B, h, w, C); weights: (B,) or None. Returns (float32 scalar loss, metrics: loss and the
    unweighted mse).
    """
    mse = _per_example_mean(jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32)))
    loss = jnp.mean(mse if weights is None else mse * weights)
    return loss, {"loss": loss, "mse": jnp.mean(mse)}
