"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models"):
diffusers' ``ControlNetModel`` for SD 1.x / 2.x and SDXL, NHWC.

A trainable copy of the UNet's encoder half (:mod:`sdjax.models.unet_encoder`: the same code, not a copy of it)
reads the noisy latents plus a control image embedded by a small conv net (``controlnet_cond_embedding``, a 4x4
stack of strided 3x3 convs down to latent size, Sec. 3.2). Each skip connection and the mid-block output go
through a 1x1 "zero convolution" (zero-initialised in training); scaled by ``conditioning_scale``, they are the
``down_block_additional_residuals`` and ``mid_block_additional_residual`` that the UNet adds to its own.
Parameter names are diffusers' (``controlnet_down_blocks_N``, ``controlnet_mid_block``, ...), so weights
convert by renaming.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from sdjax.models.layers import Conv
from sdjax.models.unet_encoder import ENCODER_NOOP_FIELDS, UNetEncoder, UNetEncoderConfig

Dtype = jnp.dtype


@dataclasses.dataclass(frozen=True)
class ControlNetConfig(UNetEncoderConfig):
    """diffusers ``ControlNetModel`` config (SD 1.x / 2.x / XL subset): the UNet encoder half's fields
    (:class:`UNetEncoderConfig`) plus the control image's.

    ``conditioning_channels``: channels of the control image (3 for RGB maps); ``conditioning_embedding_out_channels``:
    widths of the embedding's conv stages, each after the first halving the resolution (4 stages: 8x down, pixel
    to latent size); ``controlnet_conditioning_channel_order`` "rgb" or "bgr" (the image's channels are reversed);
    ``global_pool_conditions``: the residuals are averaged over H and W (ControlNet 1.1 shuffle).
    """

    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    controlnet_conditioning_channel_order: str = "rgb"
    global_pool_conditions: bool = False

    class_name: ClassVar[str] = "ControlNetModel"
    noop_fields: ClassVar[dict[str, Any]] = ENCODER_NOOP_FIELDS
    supported_values: ClassVar[tuple[tuple[str, tuple], ...]] = (
        *UNetEncoderConfig.supported_values,
        ("controlnet_conditioning_channel_order", ("rgb", "bgr")),
    )

    def __post_init__(self):
        super().__post_init__()
        if not self.conditioning_embedding_out_channels:
            raise ValueError(f"{self.class_name} config: conditioning_embedding_out_channels must not be empty")

    @property
    def conditioning_downsampling(self) -> int:
        """Control-image pixels per latent pixel: 2 ** (embedding stages - 1), 8 for every published ControlNet."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)


class ControlNetConditioningEmbedding(nn.Module):
    """diffusers ``ControlNetConditioningEmbedding``: conv_in, then per further stage a 3x3 conv and a stride-2
    3x3 conv (``blocks_2i``, ``blocks_2i+1``), SiLU after each, then conv_out (zero-initialised in training).
    (B, H, W, conditioning_channels) -> (B, H / f, W / f, embedding_channels), f = 2 ** (stages - 1)."""

    embedding_channels: int
    block_out_channels: tuple[int, ...]
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        widths = self.block_out_channels
        x = nn.swish(Conv(widths[0], (3, 3), padding=1, dtype=self.dtype, name="conv_in")(x))
        for i, (width, next_width) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            x = nn.swish(Conv(width, (3, 3), padding=1, dtype=self.dtype, name=f"blocks_{2 * i}")(x))
            x = Conv(next_width, (3, 3), strides=(2, 2), padding=1, dtype=self.dtype, name=f"blocks_{2 * i + 1}")(x)
            x = nn.swish(x)
        return Conv(self.embedding_channels, (3, 3), padding=1, dtype=self.dtype, name="conv_out")(x)


class ControlNetOutput(NamedTuple):
    """A ControlNet's residuals for the UNet (diffusers' names): one per skip connection, in order, and one for
    the mid block; the UNet takes them as ``down_block_additional_residuals`` / ``mid_block_additional_residual``."""

    down_block_res_samples: tuple[jax.Array, ...]
    mid_block_res_sample: jax.Array


class ControlNetModel(nn.Module):
    """ControlNet, numerically matching diffusers 0.42's ``ControlNetModel``.

    ``apply({"params": p}, sample, timesteps, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0
    [, text_embeds=..., time_ids=...], guess_mode=False)``:
      sample (B, h, w, in_channels) latents, timesteps, encoder_hidden_states, text_embeds, time_ids: as the UNet's
        (:class:`sdjax.models.unet.UNet2DConditionModel`; text_embeds / time_ids for SDXL ControlNets only);
      controlnet_cond (B, h * f, w * f, conditioning_channels) the control image (diffusers' pipelines pass
        [0, 1] RGB), f = ``config.conditioning_downsampling`` (8);
      conditioning_scale: a float or traced scalar multiplying every residual (``controlnet_conditioning_scale``);
      guess_mode (static): the residuals scaled geometrically from 0.1 (first skip) to 1.0 (mid block), times
        conditioning_scale, unless ``global_pool_conditions``;
      -> :class:`ControlNetOutput` in ``dtype``: residuals shaped as the UNet's skips and mid-block output
        ((B, 1, 1, C) each with ``global_pool_conditions``).
    """

    config: ControlNetConfig
    dtype: Dtype = jnp.float32
    remat: bool = False

    config_class: ClassVar[type] = ControlNetConfig
    torch_ignored_keys: ClassVar[tuple[str, ...]] = ()
    torch_key_renames: ClassVar[tuple[tuple[str, str], ...]] = ()

    def dummy_inputs(self) -> tuple[Any, ...]:
        """Smallest (sample, timesteps, encoder_hidden_states, controlnet_cond, conditioning_scale[, text_embeds,
        time_ids]) whose ``init`` creates every parameter."""
        sample, timesteps, context, *added = UNetEncoder(self.config).dummy_inputs()
        f, (_, h, w, _) = self.config.conditioning_downsampling, sample.shape
        cond = jnp.zeros((1, h * f, w * f, self.config.conditioning_channels), jnp.float32)
        return (sample, timesteps, context, cond, 1.0, *added)

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array | int | float,
        encoder_hidden_states: jax.Array,
        controlnet_cond: jax.Array,
        conditioning_scale: float | jax.Array = 1.0,
        text_embeds: jax.Array | None = None,
        time_ids: jax.Array | None = None,
        guess_mode: bool = False,
    ) -> ControlNetOutput:
        cfg = self.config
        encoder = UNetEncoder(cfg, self.dtype, self.remat, name="ControlNet")
        timesteps = jnp.asarray(timesteps)
        text_embeds, time_ids = (None if x is None else jnp.asarray(x) for x in (text_embeds, time_ids))
        encoder.check_inputs(sample, timesteps, encoder_hidden_states, text_embeds, time_ids)
        self._check_cond(sample.shape, jnp.shape(controlnet_cond))
        if cfg.controlnet_conditioning_channel_order == "bgr":
            controlnet_cond = controlnet_cond[..., ::-1]

        temb = encoder.embed_time(timesteps, sample.shape[0], text_embeds, time_ids)
        cond = ControlNetConditioningEmbedding(
            cfg.block_out_channels[0],
            cfg.conditioning_embedding_out_channels,
            dtype=self.dtype,
            name="controlnet_cond_embedding",
        )(jnp.asarray(controlnet_cond, self.dtype))
        x, skips = encoder.down(encoder.conv_in(sample) + cond, temb, encoder_hidden_states)
        x = encoder.mid(x, temb, encoder_hidden_states)

        down = [self._zero_conv(s, f"controlnet_down_blocks_{i}") for i, s in enumerate(skips)]
        mid = self._zero_conv(x, "controlnet_mid_block")
        return scale_residuals(down, mid, conditioning_scale, guess_mode, cfg.global_pool_conditions)

    def _zero_conv(self, x: jax.Array, name: str) -> jax.Array:
        return Conv(x.shape[-1], (1, 1), dtype=self.dtype, name=name)(x)

    def _check_cond(self, sample_shape: tuple[int, ...], cond_shape: tuple[int, ...]) -> None:
        cfg = self.config
        b, h, w, _ = sample_shape
        f = cfg.conditioning_downsampling
        expected = (b, h * f, w * f, cfg.conditioning_channels)
        if tuple(cond_shape) != expected:
            raise ValueError(
                f"controlnet_cond must be the control image {expected} (B, {f}h, {f}w, conditioning_channels) for "
                f"latents {tuple(sample_shape)}; got {tuple(cond_shape)}"
            )


def scale_residuals(
    down: Sequence[jax.Array],
    mid: jax.Array,
    conditioning_scale: float | jax.Array,
    guess_mode: bool = False,
    global_pool: bool = False,
) -> ControlNetOutput:
    """The zero-conv outputs scaled as diffusers' ControlNetModel scales them: by ``conditioning_scale``; in guess
    mode by 10 ** linspace(-1, 0) over the skips and the mid block too (the first skip 0.1x, the mid block 1x),
    unless ``global_pool`` (then averaged over H and W, keeping the axes). Dtypes are kept."""
    scale = jnp.asarray(conditioning_scale, jnp.float32)
    if guess_mode and not global_pool:
        scales = jnp.asarray(np.logspace(-1.0, 0.0, len(down) + 1, dtype=np.float32)) * scale
    else:
        scales = jnp.broadcast_to(scale, (len(down) + 1,))
    down = [(r * scales[i]).astype(r.dtype) for i, r in enumerate(down)]
    mid = (mid * scales[-1]).astype(mid.dtype)
    if global_pool:
        down = [jnp.mean(r, axis=(1, 2), keepdims=True) for r in down]
        mid = jnp.mean(mid, axis=(1, 2), keepdims=True)
    return ControlNetOutput(tuple(down), mid)
