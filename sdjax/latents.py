"""The latent codec: images <-> the scaled latents the diffusion model works on, one definition for sampling
and training.

    latents = (z - shift_factor) * scaling_factor        z ~ q(z | image), the VAE posterior
    image   = decode(latents / scaling_factor + shift_factor)

``scaling_factor`` (0.18215 for SD 1.x/2.x, 0.13025 for SDXL) gives the latents unit variance; ``shift_factor``
(None for SD, set by later VAEs) centres them. Both come from the VAE's config.json.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def latent_shape(vae: Any, height: int, width: int) -> tuple[int, int, int]:
    """(h, w, C) of the latents of a (height, width) image: both sides divided by the VAE's downsampling factor."""
    factor = vae.config.downsampling_factor
    return (height // factor, width // factor, vae.config.latent_channels)


def to_latents(vae: Any, z: jax.Array) -> jax.Array:
    """Unscaled VAE latents z (B, h, w, C) -> float32 diffusion latents (z - shift_factor) * scaling_factor."""
    z = z.astype(jnp.float32)
    if vae.config.shift_factor is not None:
        z = z - vae.config.shift_factor
    return z * vae.config.scaling_factor


def from_latents(vae: Any, latents: jax.Array) -> jax.Array:
    """Diffusion latents (B, h, w, C) -> unscaled VAE latents latents / scaling_factor + shift_factor, float32."""
    z = latents.astype(jnp.float32) / vae.config.scaling_factor
    if vae.config.shift_factor is not None:
        z = z + vae.config.shift_factor
    return z


def encode(vae: Any, params: Any, images: jax.Array, noise: jax.Array | None = None) -> jax.Array:
    """Images (B, H, W, 3) in [-1, 1] -> float32 diffusion latents (B, h, w, C) of z = posterior mean + std *
    ``noise`` (a standard-normal (B, h, w, C) draw; the mean when None)."""
    posterior = vae.apply({"params": params}, images.astype(vae.dtype), method=vae.encode)
    z = posterior.mean if noise is None else posterior.mean + posterior.std * noise.astype(jnp.float32)
    return to_latents(vae, z)


def decode(vae: Any, params: Any, latents: jax.Array) -> jax.Array:
    """Diffusion latents (B, h, w, C) -> float32 images (B, h*f, w*f, 3) in [0, 1] (clipped)."""
    image = vae.apply({"params": params}, from_latents(vae, latents).astype(vae.dtype), method=vae.decode)
    return jnp.clip(image.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
