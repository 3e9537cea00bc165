"""The resolution levels of the SD UNet (diffusers ``unet_2d_blocks``): down blocks, the mid block, up blocks.
Each is ResNets with the time embedding, optionally a spatial transformer after each, and a resampler. NHWC."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from sdjax.models.layers import Downsample2D, ResnetBlock2D, Upsample2D
from sdjax.models.transformer import Transformer2DModel, TransformerSpec

Dtype = jnp.dtype

_RematResnetBlock2D = nn.remat(ResnetBlock2D)


def _resnet_block(remat: bool) -> type[nn.Module]:
    return _RematResnetBlock2D if remat else ResnetBlock2D


class DownBlock2D(nn.Module):
    """diffusers ``DownBlock2D``, or ``CrossAttnDownBlock2D`` when ``attentions`` (one spec per layer) is set:
    ``num_layers`` x (ResNet [+ Transformer2DModel]) then an optional stride-2 downsampler.

    (B, H, W, Cin) -> ((B, H', W', out_channels), skips) where skips holds every layer's output (and the
    downsampled one), in order, for the up path.
    """

    out_channels: int
    num_layers: int
    attentions: tuple[TransformerSpec, ...] = ()
    add_downsample: bool = True
    downsample_padding: int = 1
    groups: int = 32
    eps: float = 1e-5
    remat: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        resnet = _resnet_block(self.remat)
        skips = []
        for i in range(self.num_layers):
            x = resnet(self.out_channels, self.groups, self.eps, dtype=self.dtype, name=f"resnets_{i}")(x, temb)
            if self.attentions:
                x = Transformer2DModel(
                    self.attentions[i], self.groups, self.remat, dtype=self.dtype, name=f"attentions_{i}"
                )(x, context)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(
                self.out_channels,
                pad_right_bottom=self.downsample_padding == 0,
                dtype=self.dtype,
                name="downsamplers_0",
            )(x)
            skips.append(x)
        return x, tuple(skips)


class UpBlock2D(nn.Module):
    """diffusers ``UpBlock2D``, or ``CrossAttnUpBlock2D`` when ``attentions`` (one spec per layer) is set:
    ``num_layers`` x (concat the last skip on channels, ResNet [+ Transformer2DModel]) then an optional x2 upsampler.

    (B, H, W, C), skips (num_layers tensors (B, H, W, Ci), consumed from the end) -> (B, H', W', out_channels).
    """

    out_channels: int
    num_layers: int
    attentions: tuple[TransformerSpec, ...] = ()
    add_upsample: bool = True
    groups: int = 32
    eps: float = 1e-5
    remat: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        skips: tuple[jax.Array, ...],
        temb: jax.Array,
        context: jax.Array,
        upsample_size: tuple[int, int] | None = None,
    ) -> jax.Array:
        resnet = _resnet_block(self.remat)
        for i in range(self.num_layers):
            x = jnp.concatenate([x, skips[-1 - i]], axis=-1)
            x = resnet(self.out_channels, self.groups, self.eps, dtype=self.dtype, name=f"resnets_{i}")(x, temb)
            if self.attentions:
                x = Transformer2DModel(
                    self.attentions[i], self.groups, self.remat, dtype=self.dtype, name=f"attentions_{i}"
                )(x, context)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x, upsample_size)
        return x


class UNetMidBlock2DCrossAttn(nn.Module):
    """diffusers ``UNetMidBlock2DCrossAttn`` (one layer): ResNet, Transformer2DModel, ResNet.
    (B, H, W, C) -> (B, H, W, C)."""

    attention: TransformerSpec
    groups: int = 32
    eps: float = 1e-5
    remat: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
        resnet = _resnet_block(self.remat)
        channels = x.shape[-1]
        x = resnet(channels, self.groups, self.eps, dtype=self.dtype, name="resnets_0")(x, temb)
        x = Transformer2DModel(self.attention, self.groups, self.remat, dtype=self.dtype, name="attentions_0")(
            x, context
        )
        return resnet(channels, self.groups, self.eps, dtype=self.dtype, name="resnets_1")(x, temb)
