"""Image-to-image: start from an init image's latents noised to the plan's first step (or from given latents).

Inputs: ``init`` float32 (B, H, W, 3) in [-1, 1], or, with ``init_latents``, diffusion latents (B, h, w, C)
(SDXL's refiner continuing the base model's output, ``add_noise=False`` when the plan starts at
``denoising_start``). The plan's first row holds the start level (``strength``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from sdjax import latents, samplers
from sdjax.errors import PipelineError
from sdjax.images import load_image
from sdjax.tasks.base import Prepared, Run, Task

POSTERIOR = 1  # the random stream of the init image's posterior sample (see sdjax.denoise)


def encode_images(run: Run, images: jax.Array, tag: int = POSTERIOR) -> jax.Array:
    """Images (B, H, W, 3) in [-1, 1] -> diffusion latents (B, h, w, C) float32: a posterior sample, image i's
    from its key under ``tag``."""
    keys = jax.vmap(lambda k: jax.random.fold_in(k, tag))(jax.random.wrap_key_data(run.inputs["keys"]))
    vae = run.spec.vae
    shape = latents.latent_shape(vae, images.shape[1], images.shape[2])
    eps = jax.vmap(lambda k: jax.random.normal(k, shape))(keys)
    return latents.encode(vae, run.params["vae"], images, eps).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Img2Img(Task):
    """init_latents: the input is already latents (no VAE encode); add_noise: False starts from it as it is."""

    init_latents: bool = False
    add_noise: bool = True

    key: ClassVar[str] = "img2img"

    def start(self, run: Run, noise: jax.Array) -> jax.Array:
        init = run.arrays(self)["init"]
        x0 = init.astype(jnp.float32) if self.init_latents else encode_images(run, init)
        return samplers.noised_latents(run.spec.plan, x0, noise) if self.add_noise else x0


def is_latents(init: Any) -> bool:
    """Whether an img2img input is diffusion latents (a 4-d array (N, h, w, C)) rather than an image."""
    return isinstance(init, (np.ndarray, jax.Array)) and np.ndim(init) == 4


def prepare(init_image: Any, n: int, height: int, width: int, latent_shape: tuple, add_noise: bool) -> Prepared:
    """The img2img task for ``n`` images of ``height`` x ``width``: an image (path, PIL, (H, W, 3) array) or
    latents (N or 1, h, w, C); PipelineError (one line) when they do not fit."""
    if not is_latents(init_image):
        return Prepared(Img2Img(False, add_noise), {"init": broadcast_image(load_image(init_image, height, width), n)})
    init = np.asarray(init_image, np.float32)
    if init.shape[1:] != latent_shape or init.shape[0] not in (1, n):
        raise PipelineError(
            f"init latents must have shape ({n}, {', '.join(map(str, latent_shape))}) (or a leading 1) for "
            f"{n} images of {height}x{width}, got {init.shape}"
        )
    if not np.isfinite(init).all():
        raise PipelineError("init latents contain NaN or inf")
    return Prepared(Img2Img(True, add_noise), {"init": jnp.broadcast_to(jnp.asarray(init), (n, *latent_shape))})


def broadcast_image(image: jax.Array, n: int) -> jax.Array:
    return jnp.broadcast_to(image, (n, *image.shape))
