"""The Stable Diffusion 1.x / 2.x / XL noise-prediction UNet (diffusers ``UNet2DConditionModel``), NHWC.

A UNet over latents with a sinusoidal timestep embedding added in every ResNet block and text conditioning
through cross-attention in Transformer2DModel blocks (Rombach et al. 2022, "High-Resolution Image Synthesis
with Latent Diffusion Models"). SDXL (Podell et al. 2023, "SDXL: Improving Latent Diffusion Models for
High-Resolution Image Synthesis", Sec. 2.2) adds "text_time" conditioning: the pooled text embedding and the
sinusoidally embedded size/crop (/aesthetic score) ids go through one more MLP into the time embedding.
Submodule names mirror diffusers' attribute paths (``down_blocks_0``, ``resnets_1``, ``attentions_0``,
``transformer_blocks_0``, ``ff/net_0/proj``, ``add_embedding/linear_1`` ...) so weights convert by renaming.

The encoder half (embeddings, ``conv_in``, down blocks, mid block) is :mod:`sdjax.models.unet_encoder`, which
the ControlNet shares; this file adds the up path and the ControlNet residuals.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from sdjax.models.embeddings import TimestepEmbedding, get_timestep_embedding
from sdjax.models.layers import Conv
from sdjax.models.transformer import BasicTransformerBlock, FeedForward, Transformer2DModel, TransformerSpec
from sdjax.models.unet_blocks import DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D
from sdjax.models.unet_encoder import ENCODER_NOOP_FIELDS, UNetEncoder, UNetEncoderConfig

# Kept importable from here (they lived in this file before the encoder half was split out).
__all__ = [
    "BasicTransformerBlock",
    "DownBlock2D",
    "FeedForward",
    "TimestepEmbedding",
    "Transformer2DModel",
    "TransformerSpec",
    "UNet2DConditionConfig",
    "UNet2DConditionModel",
    "UNetMidBlock2DCrossAttn",
    "UpBlock2D",
    "get_timestep_embedding",
]

Dtype = jnp.dtype

_UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")


@dataclasses.dataclass(frozen=True)
class UNet2DConditionConfig(UNetEncoderConfig):
    """diffusers ``UNet2DConditionModel`` config (SD 1.x / 2.x / XL subset); defaults are diffusers' defaults.

    The encoder half's fields are :class:`UNetEncoderConfig`'s. With per-layer lists in
    ``transformer_layers_per_block``, ``reverse_transformer_layers_per_block`` (one int or list per up block, in
    up-block order) is needed too, as diffusers requires for an asymmetric UNet.
    """

    sample_size: int | tuple[int, int] | None = None
    out_channels: int = 4
    center_input_sample: bool = False
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    reverse_transformer_layers_per_block: tuple[int | tuple[int, ...], ...] | None = None

    class_name: ClassVar[str] = "UNet2DConditionModel"
    noop_fields: ClassVar[dict[str, Any]] = {
        **ENCODER_NOOP_FIELDS,
        "dropout": 0.0,
        "dual_cross_attention": False,
        "resnet_skip_time_act": False,
        "resnet_out_scale_factor": 1.0,
        "time_embedding_type": "positional",
        "time_embedding_dim": None,
        "time_embedding_act_fn": None,
        "timestep_post_act": None,
        "time_cond_proj_dim": None,
        "conv_in_kernel": 3,
        "conv_out_kernel": 3,
        "attention_type": "default",
        "class_embeddings_concat": False,
        "mid_block_only_cross_attention": None,
        "cross_attention_norm": None,
    }
    supported_values: ClassVar[tuple[tuple[str, tuple], ...]] = (
        *UNetEncoderConfig.supported_values,
        ("up_block_types", _UP_BLOCK_TYPES),
    )
    per_block_fields: ClassVar[tuple[str, ...]] = (
        *UNetEncoderConfig.per_block_fields,
        "up_block_types",
        "reverse_transformer_layers_per_block",
    )

    def _check_transformer_depths(self) -> None:
        nested = any(isinstance(d, tuple) for d in self._per_block(self.transformer_layers_per_block))
        if nested and self.reverse_transformer_layers_per_block is None:
            raise ValueError(
                f"{self.class_name} config: transformer_layers_per_block={self.transformer_layers_per_block!r} "
                "has per-layer lists; give reverse_transformer_layers_per_block too (one entry per up block), "
                "as diffusers requires for an asymmetric UNet"
            )
        super()._check_transformer_depths()
        if self.reverse_transformer_layers_per_block is not None:
            up_layers = tuple(layers + 1 for layers in reversed(self.layers()))
            self._check_depths(
                "reverse_transformer_layers_per_block", self.reverse_transformer_layers_per_block, up_layers
            )

    def up_transformer_depths(self, up_block: int) -> tuple[int, ...]:
        """BasicTransformerBlocks of each layer's Transformer2DModel in up block ``up_block`` (up-block order):
        ``reverse_transformer_layers_per_block[up_block]`` when given, else the mirrored down block's depth."""
        block = len(self.block_out_channels) - 1 - up_block  # the down block at the same resolution
        layers = self.layers()[block] + 1
        if self.reverse_transformer_layers_per_block is not None:
            depths = self.reverse_transformer_layers_per_block[up_block]
        else:
            depths = self._per_block(self.transformer_layers_per_block)[block]
        return depths[:layers] if isinstance(depths, tuple) else (depths,) * layers


class UNet2DConditionModel(nn.Module):
    """Stable Diffusion 1.x / 2.x / XL UNet, numerically matching diffusers 0.42's ``UNet2DConditionModel``.

    ``apply({"params": p}, sample, timesteps, encoder_hidden_states[, text_embeds=..., time_ids=...])``:
      sample (B, H, W, in_channels) NHWC, H and W multiples of 2 ** (number of blocks - 1);
      timesteps a scalar or (B,) (int or float; (1,) broadcasts);
      encoder_hidden_states (B, S, cross_attention_dim) text embeddings;
      text_embeds (B, P), time_ids (B, N) float: only for ``addition_embed_type="text_time"`` (SDXL), where
        P + N * addition_time_embed_dim = projection_class_embeddings_input_dim (SDXL base: the pooled 1280-wide
        text embedding and 6 ids, original size + crop top-left + target size; refiner: 1280 and 5 ids, original
        size + crop top-left + aesthetic score). diffusers passes these two in ``added_cond_kwargs``;
      down_block_additional_residuals: a ControlNet's residuals, one per skip connection (the conv_in output, then
        each down block's layers and downsampler: shapes of the skips, or (B, 1, 1, C) from a pooled ControlNet),
        added to the skips the up path reads; mid_block_additional_residual (B, h, w, C), added to the mid
        block's output. Both or neither, as diffusers' ControlNet pipelines pass them;
      -> (B, H, W, out_channels) in ``dtype`` (the predicted noise or velocity).
    ``remat`` recomputes ResNet and transformer blocks in the backward pass (gradient checkpointing).
    """

    config: UNet2DConditionConfig
    dtype: Dtype = jnp.float32
    remat: bool = False

    config_class: ClassVar[type] = UNet2DConditionConfig
    torch_ignored_keys: ClassVar[tuple[str, ...]] = ()
    torch_key_renames: ClassVar[tuple[tuple[str, str], ...]] = ()

    def dummy_inputs(self) -> tuple[jax.Array, ...]:
        """Smallest (sample, timesteps, encoder_hidden_states[, text_embeds, time_ids]) whose ``init`` creates every
        parameter (see :meth:`UNetEncoder.dummy_inputs`)."""
        return UNetEncoder(self.config).dummy_inputs()

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array | int | float,
        encoder_hidden_states: jax.Array,
        text_embeds: jax.Array | None = None,
        time_ids: jax.Array | None = None,
        down_block_additional_residuals: Sequence[jax.Array] | None = None,
        mid_block_additional_residual: jax.Array | None = None,
    ) -> jax.Array:
        cfg = self.config
        encoder = UNetEncoder(cfg, self.dtype, self.remat)
        timesteps = jnp.asarray(timesteps)
        text_embeds, time_ids = (None if x is None else jnp.asarray(x) for x in (text_embeds, time_ids))
        encoder.check_inputs(sample, timesteps, encoder_hidden_states, text_embeds, time_ids)

        if cfg.center_input_sample:
            sample = 2 * sample - 1.0
        temb = encoder.embed_time(timesteps, sample.shape[0], text_embeds, time_ids)
        x, skips = encoder.down(encoder.conv_in(sample), temb, encoder_hidden_states)
        x = encoder.mid(x, temb, encoder_hidden_states)
        if down_block_additional_residuals is not None or mid_block_additional_residual is not None:
            skips, x = add_control_residuals(skips, x, down_block_additional_residuals, mid_block_additional_residual)
        x = self._up(x, skips, temb, encoder_hidden_states)

        x = nn.GroupNorm(
            cfg.norm_num_groups, epsilon=cfg.norm_eps, use_fast_variance=False, dtype=self.dtype, name="conv_norm_out"
        )(x)
        return Conv(cfg.out_channels, (3, 3), padding=1, dtype=self.dtype, name="conv_out")(nn.swish(x))

    def _up(self, x: jax.Array, skips: list[jax.Array], temb: jax.Array, context: jax.Array) -> jax.Array:
        cfg = self.config
        n = len(cfg.block_out_channels)
        for i, block_type in enumerate(cfg.up_block_types):
            block = n - 1 - i  # the down block at the same resolution
            channels, num_layers = cfg.block_out_channels[block], cfg.layers()[block] + 1
            depths = cfg.up_transformer_depths(i) if block_type == "CrossAttnUpBlock2D" else ()
            block_skips, skips = tuple(skips[-num_layers:]), skips[:-num_layers]
            # Odd sizes halve to ceil(H / 2) on the way down; upsample to the next skip's size, as diffusers does.
            upsample_size = skips[-1].shape[1:3] if i < n - 1 else None
            x = UpBlock2D(
                channels,
                num_layers,
                attentions=tuple(cfg.transformer_spec(block, d) for d in depths),
                add_upsample=i < n - 1,
                groups=cfg.norm_num_groups,
                eps=cfg.norm_eps,
                remat=self.remat,
                dtype=self.dtype,
                name=f"up_blocks_{i}",
            )(x, block_skips, temb, context, upsample_size)
        return x


def add_control_residuals(
    skips: list[jax.Array], mid: jax.Array, down_residuals: Sequence[jax.Array] | None, mid_residual: jax.Array | None
) -> tuple[list[jax.Array], jax.Array]:
    """The skips and mid-block output with a ControlNet's residuals added, as diffusers' UNet adds them; each
    residual in the activation's dtype. ValueError (one line) when they do not fit."""
    if down_residuals is None or mid_residual is None:
        raise ValueError(
            "ControlNet residuals come in pairs: pass both down_block_additional_residuals and "
            "mid_block_additional_residual (T2I-Adapter style intra-block residuals are not supported)"
        )
    expected = [tuple(s.shape) for s in skips]
    got = [tuple(jnp.shape(r)) for r in down_residuals]
    if len(got) != len(expected) or not all(_broadcasts(r, s) for r, s in zip(got, expected, strict=False)):
        raise ValueError(
            f"down_block_additional_residuals must be {len(expected)} arrays shaped as the UNet's skip connections "
            f"{expected} (or (B, 1, 1, C)); got {len(got)}: {got}"
        )
    if not _broadcasts(tuple(jnp.shape(mid_residual)), tuple(mid.shape)):
        raise ValueError(
            f"mid_block_additional_residual must have shape {tuple(mid.shape)} (or (B, 1, 1, C)), got "
            f"{tuple(jnp.shape(mid_residual))}"
        )
    skips = [s + jnp.asarray(r).astype(s.dtype) for s, r in zip(skips, down_residuals, strict=True)]
    return skips, mid + jnp.asarray(mid_residual).astype(mid.dtype)


def _broadcasts(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    return len(shape) == len(target) and all(a in (1, b) for a, b in zip(shape, target, strict=True))
