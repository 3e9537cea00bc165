"""AutoencoderKL: the Stable Diffusion VAE (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent
Diffusion Models", Sec. 3 and App. G), numerically matching diffusers 0.42's ``AutoencoderKL``. NHWC throughout.

Images (B, H, W, 3) in [-1, 1] -> posterior over latents (B, H/f, W/f, latent_channels), f = 2**(n_blocks - 1),
and latents -> images. Scaling latents by ``config.scaling_factor`` (and ``shift_factor``) is the caller's job,
as in diffusers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct

from sdjax.models.config import ModelConfig, UnsupportedConfigError
from sdjax.models.layers import Attention, Conv, Downsample2D, Dtype, ResnetBlock2D, Upsample2D

# diffusers builds every VAE norm with this epsilon, whatever the config says.
NORM_EPS = 1e-6
# diffusers' DiagonalGaussianDistribution clamps logvar to this range before exponentiating.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig(ModelConfig):
    """diffusers ``AutoencoderKL`` config; defaults are diffusers' defaults so old config.json files that omit a
    field (SD 1.x omits ``scaling_factor``) load with the values diffusers would use."""

    class_name: ClassVar[str] = "AutoencoderKL"
    noop_fields: ClassVar[dict[str, Any]] = {"act_fn": "silu", "latents_mean": None, "latents_std": None}

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        n = len(self.block_out_channels)
        for name, types, supported in (
            ("down_block_types", self.down_block_types, "DownEncoderBlock2D"),
            ("up_block_types", self.up_block_types, "UpDecoderBlock2D"),
        ):
            if any(t != supported for t in types):
                raise UnsupportedConfigError(f"AutoencoderKL {name}={list(types)}: only {supported!r} is supported")
            if len(types) != n:
                raise ValueError(
                    f"AutoencoderKL {name} has {len(types)} entries but block_out_channels has {n}; they must match"
                )
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if n == 0 or bad:
            raise ValueError(
                f"AutoencoderKL block_out_channels={list(self.block_out_channels)} must be non-empty and divisible "
                f"by norm_num_groups={self.norm_num_groups}"
            )

    @property
    def downsampling_factor(self) -> int:
        """Image pixels per latent pixel along each side: 2 ** (number of blocks - 1), 8 for SD."""
        return 2 ** (len(self.block_out_channels) - 1)


@struct.dataclass
class DiagonalGaussian:
    """Posterior q(z|x) = N(mean, exp(logvar)), (B, h, w, C) float32 arrays; a pytree, so it crosses jit."""

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> DiagonalGaussian:
        """(B, h, w, 2C) encoder output, mean channels first -> posterior with logvar clipped to [-30, 20]."""
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, rng: jax.Array) -> jax.Array:
        """z = mean + std * eps with eps ~ N(0, I) drawn from ``rng``; (B, h, w, C) float32."""
        return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        """The most likely latent, the mean; (B, h, w, C) float32."""
        return self.mean

    def kl(self) -> jax.Array:
        """KL(q || N(0, I)) per example, summed over h, w, C as diffusers does; (B,) float32."""
        return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=(1, 2, 3))


def _resnet(config: AutoencoderKLConfig, channels: int, dtype: Dtype, name: str) -> ResnetBlock2D:
    return ResnetBlock2D(channels, groups=config.norm_num_groups, eps=NORM_EPS, dtype=dtype, name=name)


class UNetMidBlock2D(nn.Module):
    """diffusers ``UNetMidBlock2D`` as the VAE builds it: resnet, single-head spatial self-attention with
    group norm and residual, resnet. (B, h, w, C) -> (B, h, w, C)."""

    config: AutoencoderKLConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        x = _resnet(self.config, channels, self.dtype, "resnets_0")(x)
        if self.config.mid_block_add_attention:
            # diffusers sets attention_head_dim = channels here, hence one head; it also upcasts the softmax.
            x = Attention(
                heads=1,
                dim_head=channels,
                qkv_bias=True,
                upcast_attention=True,
                norm_num_groups=self.config.norm_num_groups,
                norm_eps=NORM_EPS,
                dtype=self.dtype,
                name="attentions_0",
            )(x)
        return _resnet(self.config, channels, self.dtype, "resnets_1")(x)


class DownEncoderBlock2D(nn.Module):
    """``layers_per_block`` resnets, then (except on the last block) a stride-2 conv with the VAE's asymmetric
    (0, 1, 0, 1) padding. (B, H, W, Cin) -> (B, H/2, W/2, out_channels) or (B, H, W, out_channels)."""

    config: AutoencoderKLConfig
    out_channels: int
    add_downsample: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.config.layers_per_block):
            x = _resnet(self.config, self.out_channels, self.dtype, f"resnets_{j}")(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, pad_right_bottom=True, dtype=self.dtype, name="downsamplers_0")(x)
        return x


class UpDecoderBlock2D(nn.Module):
    """``layers_per_block + 1`` resnets, then (except on the last block) nearest x2 upsampling and a conv.
    (B, h, w, Cin) -> (B, 2h, 2w, out_channels) or (B, h, w, out_channels)."""

    config: AutoencoderKLConfig
    out_channels: int
    add_upsample: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.config.layers_per_block + 1):
            x = _resnet(self.config, self.out_channels, self.dtype, f"resnets_{j}")(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """Image (B, H, W, in_channels) -> moments (B, H/f, W/f, 2 * latent_channels): mean then logvar."""

    config: AutoencoderKLConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        x = Conv(cfg.block_out_channels[0], (3, 3), padding=1, dtype=self.dtype, name="conv_in")(x)
        last = len(cfg.block_out_channels) - 1
        for i, channels in enumerate(cfg.block_out_channels):
            x = DownEncoderBlock2D(cfg, channels, i < last, self.dtype, name=f"down_blocks_{i}")(x)
        x = UNetMidBlock2D(cfg, self.dtype, name="mid_block")(x)
        x = nn.GroupNorm(cfg.norm_num_groups, epsilon=NORM_EPS, dtype=self.dtype, name="conv_norm_out")(x)
        x = nn.swish(x)
        return Conv(2 * cfg.latent_channels, (3, 3), padding=1, dtype=self.dtype, name="conv_out")(x)


class Decoder(nn.Module):
    """Latents (B, h, w, latent_channels) -> image (B, h*f, w*f, out_channels); blocks run from the widest
    (``block_out_channels[-1]``) to the narrowest, as in diffusers."""

    config: AutoencoderKLConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg = self.config
        channels = tuple(reversed(cfg.block_out_channels))
        x = Conv(channels[0], (3, 3), padding=1, dtype=self.dtype, name="conv_in")(z)
        x = UNetMidBlock2D(cfg, self.dtype, name="mid_block")(x)
        for i, out_channels in enumerate(channels):
            x = UpDecoderBlock2D(cfg, out_channels, i < len(channels) - 1, self.dtype, name=f"up_blocks_{i}")(x)
        x = nn.GroupNorm(cfg.norm_num_groups, epsilon=NORM_EPS, dtype=self.dtype, name="conv_norm_out")(x)
        x = nn.swish(x)
        return Conv(cfg.out_channels, (3, 3), padding=1, dtype=self.dtype, name="conv_out")(x)


class AutoencoderKL(nn.Module):
    """The Stable Diffusion VAE. Usage::

    posterior = vae.apply({"params": p}, images, method=vae.encode)   # images (B, H, W, 3) in [-1, 1]
    images = vae.apply({"params": p}, latents, method=vae.decode)     # latents (B, H/8, W/8, 4)
    """

    config: AutoencoderKLConfig
    dtype: Dtype = jnp.float32

    config_class: ClassVar[type] = AutoencoderKLConfig
    torch_ignored_keys: ClassVar[tuple[str, ...]] = ()
    # diffusers < 0.15 checkpoints name the mid-block attention projections like the original LDM AttnBlock.
    torch_key_renames: ClassVar[tuple[tuple[str, str], ...]] = (
        (r"(attentions\.\d+)\.query\.", r"\1.to_q."),
        (r"(attentions\.\d+)\.key\.", r"\1.to_k."),
        (r"(attentions\.\d+)\.value\.", r"\1.to_v."),
        (r"(attentions\.\d+)\.proj_attn\.", r"\1.to_out.0."),
    )

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg, self.dtype)
        self.decoder = Decoder(cfg, self.dtype)
        if cfg.use_quant_conv:
            self.quant_conv = Conv(2 * cfg.latent_channels, (1, 1), dtype=self.dtype)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = Conv(cfg.latent_channels, (1, 1), dtype=self.dtype)

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        """Images (B, H, W, in_channels) in [-1, 1], any float dtype -> float32 posterior over
        (B, H/f, W/f, latent_channels) latents, f = ``config.downsampling_factor``."""
        _check_input(x, self.config.in_channels, self.config.downsampling_factor, "images")
        moments = self.encoder(x.astype(self.dtype))
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments)

    def decode(self, z: jax.Array) -> jax.Array:
        """Unscaled latents (B, h, w, latent_channels) -> images (B, h*f, w*f, out_channels) in about [-1, 1],
        in the compute dtype."""
        _check_input(z, self.config.latent_channels, 1, "latents")
        z = z.astype(self.dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(
        self, x: jax.Array, rng: jax.Array | None = None, sample_posterior: bool = False
    ) -> tuple[jax.Array, DiagonalGaussian]:
        """Reconstruction (B, H, W, out_channels) of images x (B, H, W, in_channels), and the posterior.

        Decodes a sample drawn with ``rng`` if ``sample_posterior``, else the posterior mean.
        """
        posterior = self.encode(x)
        if sample_posterior:
            if rng is None:
                raise ValueError("AutoencoderKL: sample_posterior=True needs an rng key; got rng=None")
            z = posterior.sample(rng)
        else:
            z = posterior.mode()
        return self.decode(z), posterior

    def dummy_inputs(self) -> tuple[jax.Array]:
        """The smallest image batch that survives every downsampling: (1, f, f, in_channels) float32."""
        size = self.config.downsampling_factor
        return (jnp.zeros((1, size, size, self.config.in_channels), jnp.float32),)


def _check_input(x: jax.Array, channels: int, multiple: int, what: str) -> None:
    if x.ndim != 4 or x.shape[-1] != channels or x.shape[1] % multiple or x.shape[2] % multiple:
        raise ValueError(
            f"AutoencoderKL {what} have shape {tuple(x.shape)}; expected NHWC (B, H, W, {channels}) "
            f"with H and W multiples of {multiple}"
        )
