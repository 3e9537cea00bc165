"""``sdjax.ControlNet``: a loaded ControlNet (module, params, config) and what a pipeline checks before using it.

    controlnet = sdjax.ControlNet.from_pretrained("path/to/control_v11p_sd15_canny")  # folder or .safetensors
    controlnet.family, controlnet.cross_attention_dim, controlnet.conditioning_channels
    down, mid = controlnet(latents, t, text, control_image, scale)  # compiled; or module.apply with the params

The network is :class:`sdjax.models.controlnet.ControlNetModel`; reading weights is :mod:`sdjax.loading.controlnet`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp

from sdjax.errors import PipelineError
from sdjax.models.controlnet import ControlNetConfig, ControlNetModel, ControlNetOutput

FAMILY_NAMES = {"sd": "SD 1.x/2.x", "sdxl": "SDXL"}
# The context widths of the published families, to say which base model a ControlNet was trained for.
CONTEXT_WIDTHS = "SD 1.x: 768, SD 2.x: 1024, SDXL: 2048"


@dataclasses.dataclass(eq=False)
class ControlNet:
    """A ControlNet ready to condition a pipeline of its family.

    Attributes:
      module: the flax :class:`ControlNetModel` (computing in the loaded dtype).
      params: its parameter tree (arrays of the loaded dtype).
      source: where it was loaded from (named in errors).
    """

    module: ControlNetModel
    params: dict[str, Any]
    source: str = ""

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        dtype: Any = jnp.float32,
        variant: str | None = None,
        *,
        config: str | os.PathLike | None = None,
    ) -> ControlNet:
        """Loads a diffusers ``ControlNetModel`` folder (config.json + ``diffusion_pytorch_model[.variant]
        .safetensors``) or a single ``.safetensors`` file with diffusers' or the original ControlNet's names
        (``control_model.*``; config read from the shapes, or from ``config``: a config.json or a folder holding
        one), torch-free. ``dtype``: float32, bfloat16 or float16 params and compute."""
        from sdjax.loading import check_dtype
        from sdjax.loading.controlnet import load_controlnet

        check_dtype(dtype)
        module, params = load_controlnet(path, dtype, variant, config)
        return cls(module, params, str(path))

    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array | int | float,
        encoder_hidden_states: jax.Array,
        controlnet_cond: jax.Array,
        conditioning_scale: float | jax.Array = 1.0,
        *,
        text_embeds: jax.Array | None = None,
        time_ids: jax.Array | None = None,
        guess_mode: bool = False,
    ) -> ControlNetOutput:
        """The residuals for one UNet evaluation with this ControlNet's params, compiled once per input shapes:
        NHWC latents (B, h, w, 4), control image (B, 8h, 8w, 3) in [0, 1], other inputs and the result as
        :class:`ControlNetModel`. Inside a compiled sampling loop, call ``module.apply`` with the params as a
        traced input instead."""
        return _apply(
            self.module, self.params, sample, timesteps, encoder_hidden_states, controlnet_cond,
            jnp.float32(conditioning_scale), text_embeds, time_ids, guess_mode,
        )  # fmt: skip

    @property
    def config(self) -> ControlNetConfig:
        return self.module.config

    @property
    def family(self) -> str:
        """ "sdxl" for an SDXL ControlNet (``addition_embed_type="text_time"``), else "sd" (SD 1.x / 2.x)."""
        return "sdxl" if self.config.addition_embed_type == "text_time" else "sd"

    @property
    def cross_attention_dim(self) -> int:
        """Width of the text embeddings it attends to: 768 (SD 1.x), 1024 (SD 2.x), 2048 (SDXL)."""
        return self.config.cross_attention_dims()[0]

    @property
    def conditioning_channels(self) -> int:
        """Channels of the control image (3: RGB)."""
        return self.config.conditioning_channels

    @property
    def dtype(self) -> Any:
        return self.module.dtype

    def check_compatible(self, unet_config: Any, latent_channels: int | None = None) -> None:
        """PipelineError (one line) unless this ControlNet can condition a UNet of ``unet_config``: the same family,
        text width (and SDXL's added-embedding width), and residuals shaped as its skip connections; the
        ControlNet reads the latents (``latent_channels``, the VAE's: 4 also for a 9-channel inpainting UNet)."""
        name = f"ControlNet {self.source}".strip()
        unet_family = "sdxl" if unet_config.addition_embed_type == "text_time" else "sd"
        if unet_family != self.family:
            raise PipelineError(
                f"{name} is an {FAMILY_NAMES[self.family]} ControlNet and the pipeline is "
                f"{FAMILY_NAMES[unet_family]}; use a ControlNet trained for the pipeline's base model"
            )
        width = unet_config.cross_attention_dims()[0]
        if width != self.cross_attention_dim:
            raise PipelineError(
                f"{name} attends to {self.cross_attention_dim}-wide text and the pipeline's UNet to {width}-wide "
                f"({CONTEXT_WIDTHS}): it was trained for another base model"
            )
        pooled = unet_config.projection_class_embeddings_input_dim
        if self.family == "sdxl" and pooled != self.config.projection_class_embeddings_input_dim:
            raise PipelineError(
                f"{name} takes {self.config.projection_class_embeddings_input_dim} added-embedding inputs and the "
                f"UNet {pooled} (SDXL base: 2816, refiner: 2560): it was trained for another SDXL model"
            )
        if unet_config.skip_channels() != self.config.skip_channels():
            raise PipelineError(
                f"{name} gives residuals of {list(self.config.skip_channels())} channels and the UNet's skip "
                f"connections have {list(unet_config.skip_channels())}: its blocks do not match the UNet's"
            )
        if latent_channels is not None and latent_channels != self.config.in_channels:
            raise PipelineError(
                f"{name} reads {self.config.in_channels}-channel latents and the pipeline's VAE makes {latent_channels}"
            )


@functools.partial(jax.jit, static_argnums=(0, 9))
def _apply(
    module: ControlNetModel, params: Any, sample, timesteps, context, cond, scale, text_embeds, time_ids, guess_mode
) -> ControlNetOutput:
    added = {"text_embeds": text_embeds, "time_ids": time_ids}
    return module.apply({"params": params}, sample, timesteps, context, cond, scale, guess_mode=guess_mode, **added)
