"""Stage 1: train the VAE (``AutoencoderKL``) on images, reconstruction + KL loss; the preview shows
reconstructions of the first training images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from sdjax import images as images_lib
from sdjax.loading import folders
from sdjax.train import losses
from sdjax.train.stage import Preview
from sdjax.train.steps import LossFn, example_keys, normal


class VAEStage:
    name = "vae"
    reads_captions = False

    def trained(self, config: ml_collections.ConfigDict) -> tuple[str, ...]:
        return ("vae",)

    def write_model_folder(self, config: ml_collections.ConfigDict, folder: Path, batches_fn: Any) -> None:
        from sdjax.models.vae import AutoencoderKL, AutoencoderKLConfig

        vae = AutoencoderKL(AutoencoderKLConfig.from_dict(config.vae.to_dict()))
        folders.write_model_folder(folder, {"vae": (vae, None)})

    def loss_fn(self, config: ml_collections.ConfigDict, model: Any) -> LossFn:
        """Reconstruction + KL loss, decoding a posterior sample (``config.loss.sample_posterior``) or the
        posterior mean. Metrics: loss, reconstruction, kl, psnr."""
        vae, loss_cfg = model.modules["vae"], config.loss

        def loss_fn(params, frozen, batch, rng, step):
            del frozen  # stage 1 has no frozen component
            images = batch["image"]
            (key,) = example_keys(rng, step, images.shape[0], 1)
            posterior = vae.apply({"params": params["vae"]}, images, method=vae.encode)
            z = posterior.mean
            if loss_cfg.sample_posterior:
                z = z + posterior.std * normal(key, z.shape[1:])
            reconstructions = vae.apply({"params": params["vae"]}, z, method=vae.decode)
            return losses.vae_loss(
                images, reconstructions, posterior.kl(), kind=loss_cfg.reconstruction, kl_weight=loss_cfg.kl_weight
            )

        return loss_fn

    def preview(self, config: ml_collections.ConfigDict, model: Any, images: np.ndarray) -> Preview:
        """Originals (top row) over their reconstructions from the posterior mean."""
        vae = model.modules["vae"]
        reconstruct = jax.jit(lambda p, x: vae.apply({"params": p}, x)[0])

        def draw(params):
            recon = np.asarray(reconstruct(params["vae"], images), np.float32)
            pictures = np.concatenate([images, recon]) / 2 + 0.5
            return images_lib.image_grid(np.clip(pictures, 0, 1), cols=len(images))

        return draw
