"""The Stable Diffusion 1.x / 2.x / XL noise-prediction UNet (diffusers ``UNet2DConditionModel``), NHWC.

A UNet over latents with a sinusoidal timestep embedding added in every ResNet block and text conditioning
through cross-attention in Transformer2DModel blocks (Rombach et al. 2022, "High-Resolution Image Synthesis
with Latent Diffusion Models"). SDXL (Podell et al. 2023, "SDXL: Improving Latent Diffusion Models for
High-Resolution Image Synthesis", Sec. 2.2) adds "text_time" conditioning: the pooled text embedding and the
sinusoidally embedded size/crop (/aesthetic score) ids go through one more MLP into the time embedding.
Submodule names mirror diffusers' attribute paths (``down_blocks_0``, ``resnets_1``, ``attentions_0``,
``transformer_blocks_0``, ``ff/net_0/proj``, ``add_embedding/linear_1`` ...) so weights convert by renaming.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from sdjax.models.config import ModelConfig, UnsupportedConfigError
from sdjax.models.layers import Attention, Conv, Dense, Downsample2D, ResnetBlock2D, Upsample2D

Dtype = jnp.dtype

_DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
_MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn",)
_ADDITION_EMBED_TYPES = (None, "text_time")


@dataclasses.dataclass(frozen=True)
class UNet2DConditionConfig(ModelConfig):
    """diffusers ``UNet2DConditionModel`` config (SD 1.x / 2.x / XL subset); defaults are diffusers' defaults.

    As in diffusers, ``attention_head_dim`` is really the number of heads per block unless
    ``num_attention_heads`` is given (a historical misnaming); each head has ``channels // heads`` dims.

    ``transformer_layers_per_block`` (BasicTransformerBlocks per Transformer2DModel) is an int, one int per
    down block, or per down block a list with one depth per layer; the nested form needs
    ``reverse_transformer_layers_per_block`` (one int or list per up block, in up-block order), as diffusers.
    ``addition_embed_type="text_time"`` (SDXL) adds ``add_embedding`` from ``projection_class_embeddings_input_dim``
    = pooled text width + number of time ids * ``addition_time_embed_dim``.
    """

    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 1280
    transformer_layers_per_block: int | tuple[int | tuple[int, ...], ...] = 1
    reverse_transformer_layers_per_block: tuple[int | tuple[int, ...], ...] | None = None
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    upcast_attention: bool | None = False  # SDXL publishes null: off, as diffusers reads it
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    time_cond_proj_dim: int | None = None  # LCM-distilled UNets: the guidance-scale embedding's width

    class_name: ClassVar[str] = "UNet2DConditionModel"
    noop_fields: ClassVar[dict[str, Any]] = {
        "only_cross_attention": False,
        "mid_block_scale_factor": 1.0,
        "dropout": 0.0,
        "act_fn": "silu",
        "encoder_hid_dim": None,
        "encoder_hid_dim_type": None,
        "dual_cross_attention": False,
        "class_embed_type": None,
        "num_class_embeds": None,
        "resnet_time_scale_shift": "default",
        "resnet_skip_time_act": False,
        "resnet_out_scale_factor": 1.0,
        "time_embedding_type": "positional",
        "time_embedding_dim": None,
        "time_embedding_act_fn": None,
        "timestep_post_act": None,
        "conv_in_kernel": 3,
        "conv_out_kernel": 3,
        "attention_type": "default",
        "class_embeddings_concat": False,
        "mid_block_only_cross_attention": None,
        "cross_attention_norm": None,
        "addition_embed_type_num_heads": 64,
    }

    def __post_init__(self):
        n = len(self.block_out_channels)
        unsupported = [
            f"{name}={value!r} (supported: {', '.join(map(str, allowed))})"
            for name, values, allowed in (
                ("down_block_types", self.down_block_types, _DOWN_BLOCK_TYPES),
                ("up_block_types", self.up_block_types, _UP_BLOCK_TYPES),
                ("mid_block_type", (self.mid_block_type,), _MID_BLOCK_TYPES),
                ("downsample_padding", (self.downsample_padding,), (0, 1)),
                ("addition_embed_type", (self.addition_embed_type,), _ADDITION_EMBED_TYPES),
            )
            for value in values
            if value not in allowed
        ]
        if unsupported:
            raise UnsupportedConfigError(f"{self.class_name} config not supported: {'; '.join(unsupported)}")
        for name in (
            "down_block_types",
            "up_block_types",
            "layers_per_block",
            "cross_attention_dim",
            "transformer_layers_per_block",
            "reverse_transformer_layers_per_block",
            "attention_head_dim",
            "num_attention_heads",
        ):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != n:
                raise ValueError(
                    f"{self.class_name} config: {name} has {len(value)} entries but block_out_channels has {n}; "
                    "give one entry per block or a single int"
                )
        self._check_transformer_depths()
        self._check_text_time()

    def _check_transformer_depths(self) -> None:
        nested = any(isinstance(d, tuple) for d in self._per_block(self.transformer_layers_per_block))
        if nested and self.reverse_transformer_layers_per_block is None:
            raise ValueError(
                f"{self.class_name} config: transformer_layers_per_block={self.transformer_layers_per_block!r} "
                "has per-layer lists; give reverse_transformer_layers_per_block too (one entry per up block), "
                "as diffusers requires for an asymmetric UNet"
            )
        checks = [("transformer_layers_per_block", self._per_block(self.transformer_layers_per_block), self.layers())]
        if self.reverse_transformer_layers_per_block is not None:
            up_layers = tuple(layers + 1 for layers in reversed(self.layers()))
            checks.append(
                ("reverse_transformer_layers_per_block", self.reverse_transformer_layers_per_block, up_layers)
            )
        for name, entries, block_layers in checks:
            for i, (depths, layers) in enumerate(zip(entries, block_layers, strict=True)):
                if isinstance(depths, tuple) and len(depths) < layers:
                    raise ValueError(
                        f"{self.class_name} config: {name}[{i}]={list(depths)!r} has {len(depths)} depths for a "
                        f"block of {layers} layers; give at least one per layer"
                    )

    def _check_text_time(self) -> None:
        if self.addition_embed_type != "text_time":
            return
        time_dim, input_dim = self.addition_time_embed_dim, self.projection_class_embeddings_input_dim
        if not isinstance(time_dim, int) or not isinstance(input_dim, int) or not 0 < time_dim < input_dim:
            raise ValueError(
                f"{self.class_name} config: addition_embed_type='text_time' needs addition_time_embed_dim and "
                "projection_class_embeddings_input_dim (pooled text width + time ids * addition_time_embed_dim) "
                f"with 0 < addition_time_embed_dim < projection_class_embeddings_input_dim; got {time_dim!r} and "
                f"{input_dim!r}"
            )

    def _per_block(self, value: Any) -> tuple:
        return value if isinstance(value, tuple) else (value,) * len(self.block_out_channels)

    def heads(self) -> tuple[int, ...]:
        """Attention heads per down block (diffusers: ``num_attention_heads or attention_head_dim``)."""
        return self._per_block(self.num_attention_heads or self.attention_head_dim)

    def layers(self) -> tuple[int, ...]:
        """ResNet layers per down block (up blocks have one more)."""
        return self._per_block(self.layers_per_block)

    def down_transformer_depths(self, block: int) -> tuple[int, ...]:
        """BasicTransformerBlocks of each layer's Transformer2DModel in down block ``block``."""
        depths = self._per_block(self.transformer_layers_per_block)[block]
        layers = self.layers()[block]
        return depths[:layers] if isinstance(depths, tuple) else (depths,) * layers

    def mid_transformer_depth(self) -> int:
        """BasicTransformerBlocks in the mid block: the last down block's depth (its first layer's, if per layer),
        as diffusers picks it."""
        depths = self._per_block(self.transformer_layers_per_block)[-1]
        return depths[0] if isinstance(depths, tuple) else depths

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

    def cross_attention_dims(self) -> tuple[int, ...]:
        """Context feature size expected by each down block's cross-attention."""
        return self._per_block(self.cross_attention_dim)


def get_timestep_embedding(
    timesteps: jax.Array, embedding_dim: int, flip_sin_to_cos: bool, freq_shift: float, max_period: float = 10000.0
) -> jax.Array:
    """Sinusoidal embedding of (B,) timesteps (int or float) -> (B, embedding_dim) float32, as diffusers'
    ``get_timestep_embedding`` (DDPM, Ho et al. 2020): frequencies ``max_period ** (-i / (half - freq_shift))``."""
    half = embedding_dim // 2
    # Frequencies are compile-time constants, rounded to float32 at each step as torch does.
    exponent = np.arange(half, dtype=np.float32) * np.float32(-math.log(max_period)) / np.float32(half - freq_shift)
    freqs = np.exp(exponent)
    args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
    sin_cos = [jnp.cos(args), jnp.sin(args)] if flip_sin_to_cos else [jnp.sin(args), jnp.cos(args)]
    emb = jnp.concatenate(sin_cos, axis=-1)
    if embedding_dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """diffusers ``TimestepEmbedding``: linear_1, SiLU, linear_2. (B, Cin) -> (B, time_embed_dim). With
    ``cond_proj_dim`` (LCM-distilled UNets' ``time_cond_proj_dim``) a ``condition`` (B, cond_proj_dim) is first
    projected (``cond_proj``, no bias) and added to the input."""

    time_embed_dim: int
    dtype: Dtype = jnp.float32
    cond_proj_dim: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array, condition: jax.Array | None = None) -> jax.Array:
        if self.cond_proj_dim is not None and condition is not None:
            x = x + Dense(x.shape[-1], use_bias=False, dtype=self.dtype, name="cond_proj")(condition.astype(self.dtype))
        x = Dense(self.time_embed_dim, dtype=self.dtype, name="linear_1")(x)
        return Dense(self.time_embed_dim, dtype=self.dtype, name="linear_2")(nn.swish(x))


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): one Dense to 2*inner, split, value * GELU(gate) with PyTorch's exact (erf) GELU."""

    inner_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        value, gate = jnp.split(Dense(2 * self.inner_dim, dtype=self.dtype, name="proj")(x), 2, axis=-1)
        return value * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """diffusers ``FeedForward`` with GEGLU: ``net.0`` (GEGLU to 4*dim), ``net.2`` (Dense back to dim)."""

    mult: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        x = GEGLU(dim * self.mult, dtype=self.dtype, name="net_0")(x)
        return Dense(dim, dtype=self.dtype, name="net_2")(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention to the context, GEGLU feed-forward, each residual.
    (B, T, C), context (B, S, D) -> (B, T, C)."""

    heads: int
    dim_head: int
    upcast_attention: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        def norm(name: str) -> nn.LayerNorm:
            return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, dtype=self.dtype, name=name)

        def attention(name: str) -> Attention:
            return Attention(
                self.heads, self.dim_head, upcast_attention=self.upcast_attention, dtype=self.dtype, name=name
            )

        x = x + attention("attn1")(norm("norm1")(x))
        x = x + attention("attn2")(norm("norm2")(x), context)
        return x + FeedForward(dtype=self.dtype, name="ff")(norm("norm3")(x))


_RematBasicTransformerBlock = nn.remat(BasicTransformerBlock)
_RematResnetBlock2D = nn.remat(ResnetBlock2D)


def _resnet_block(remat: bool) -> type[nn.Module]:
    return _RematResnetBlock2D if remat else ResnetBlock2D


@dataclasses.dataclass(frozen=True)
class TransformerSpec:
    """Per-block settings of a Transformer2DModel (hashable, so it can be a linen field)."""

    heads: int
    dim_head: int
    depth: int = 1
    use_linear_projection: bool = False
    upcast_attention: bool = False


class Transformer2DModel(nn.Module):
    """diffusers ``Transformer2DModel`` on continuous input: GroupNorm(eps 1e-6), proj_in (1x1 conv or Dense),
    ``depth`` BasicTransformerBlocks over the H*W tokens, proj_out, residual. (B, H, W, C) -> (B, H, W, C)."""

    spec: TransformerSpec
    groups: int = 32
    remat: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        inner = self.spec.heads * self.spec.dim_head
        linear = self.spec.use_linear_projection
        hidden = nn.GroupNorm(self.groups, epsilon=1e-6, use_fast_variance=False, dtype=self.dtype, name="norm")(x)
        # A 1x1 conv on NHWC is the same matmul as a Dense; the two differ only in the stored kernel shape.
        if linear:
            hidden = Dense(inner, dtype=self.dtype, name="proj_in")(hidden.reshape(b, h * w, c))
        else:
            hidden = Conv(inner, (1, 1), dtype=self.dtype, name="proj_in")(hidden).reshape(b, h * w, inner)
        block = _RematBasicTransformerBlock if self.remat else BasicTransformerBlock
        for i in range(self.spec.depth):
            hidden = block(
                self.spec.heads,
                self.spec.dim_head,
                upcast_attention=self.spec.upcast_attention,
                dtype=self.dtype,
                name=f"transformer_blocks_{i}",
            )(hidden, context)
        if linear:
            hidden = Dense(c, dtype=self.dtype, name="proj_out")(hidden).reshape(b, h, w, c)
        else:
            hidden = Conv(c, (1, 1), dtype=self.dtype, name="proj_out")(hidden.reshape(b, h, w, inner))
        return hidden + x


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
      timestep_cond (B, time_cond_proj_dim): only for LCM-distilled UNets (``time_cond_proj_dim``), the guidance
        scale's embedding (:func:`sdjax.denoise.guidance_scale_embedding`), added to the timestep embedding;
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
        parameter. A text_time UNet gets one time id and the rest of ``projection_class_embeddings_input_dim`` as
        text_embeds: only their total width shapes ``add_embedding``."""
        cfg = self.config
        size = 2 ** (len(cfg.block_out_channels) - 1)
        inputs = (
            jnp.zeros((1, size, size, cfg.in_channels), jnp.float32),
            jnp.zeros((1,), jnp.float32),
            jnp.zeros((1, 1, cfg.cross_attention_dims()[0]), jnp.float32),
        )
        added = (None, None)
        if cfg.addition_embed_type == "text_time":
            pooled = cfg.projection_class_embeddings_input_dim - cfg.addition_time_embed_dim
            added = (jnp.zeros((1, pooled), jnp.float32), jnp.zeros((1, 1), jnp.float32))
        if cfg.time_cond_proj_dim is not None:
            return (*inputs, *added, jnp.zeros((1, cfg.time_cond_proj_dim), jnp.float32))
        return inputs if added[0] is None else (*inputs, *added)

    def _transformer_spec(self, block: int, depth: int) -> TransformerSpec:
        cfg = self.config
        heads = cfg.heads()[block]
        return TransformerSpec(
            heads=heads,
            dim_head=cfg.block_out_channels[block] // heads,
            depth=depth,
            use_linear_projection=cfg.use_linear_projection,
            upcast_attention=bool(cfg.upcast_attention),
        )

    def _check_inputs(self, sample: jax.Array, timesteps: jax.Array, context: jax.Array) -> None:
        cfg = self.config
        if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
            raise ValueError(f"sample must be NHWC (B, H, W, {cfg.in_channels}), got shape {sample.shape}")
        batch = sample.shape[0]
        if timesteps.ndim > 1 or (timesteps.ndim == 1 and timesteps.shape[0] not in (1, batch)):
            raise ValueError(f"timesteps must be a scalar, (1,) or (batch={batch},), got shape {timesteps.shape}")
        dims = set(cfg.cross_attention_dims())
        if context.ndim != 3 or context.shape[0] != batch or {context.shape[-1]} != dims:
            raise ValueError(
                f"encoder_hidden_states must be (batch={batch}, S, {'|'.join(map(str, sorted(dims)))}), "
                f"got shape {context.shape}"
            )

    def _check_added_conditions(self, batch: int, text_embeds: jax.Array | None, time_ids: jax.Array | None) -> None:
        cfg = self.config
        given = [name for name, x in (("text_embeds", text_embeds), ("time_ids", time_ids)) if x is not None]
        if cfg.addition_embed_type != "text_time":
            if given:
                raise ValueError(
                    f"{' and '.join(given)} given to a UNet with addition_embed_type={cfg.addition_embed_type!r}; "
                    "only addition_embed_type='text_time' (SDXL) UNets take text_embeds and time_ids"
                )
            return
        expected = (
            f"text_embeds (batch={batch}, P) and time_ids (batch={batch}, N) with P + N * "
            f"{cfg.addition_time_embed_dim} = {cfg.projection_class_embeddings_input_dim} (SDXL base: P=1280, N=6; "
            "refiner: P=1280, N=5)"
        )
        if len(given) < 2:
            raise ValueError(
                f"this UNet has addition_embed_type='text_time' and needs {expected}; got "
                f"{'only ' + given[0] if given else 'neither'}"
            )
        width = text_embeds.shape[-1] + time_ids.shape[-1] * cfg.addition_time_embed_dim
        if (
            text_embeds.ndim != 2
            or time_ids.ndim != 2
            or text_embeds.shape[0] != batch
            or time_ids.shape[0] != batch
            or width != cfg.projection_class_embeddings_input_dim
        ):
            raise ValueError(
                f"this UNet needs {expected}; got text_embeds {tuple(text_embeds.shape)} and time_ids "
                f"{tuple(time_ids.shape)}"
            )

    def _time_embedding(self, timesteps: jax.Array, batch: int, condition: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        timesteps = jnp.broadcast_to(timesteps.reshape(-1), (batch,))
        t_emb = get_timestep_embedding(
            timesteps, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift
        ).astype(self.dtype)
        embedding = TimestepEmbedding(
            cfg.block_out_channels[0] * 4, dtype=self.dtype, cond_proj_dim=cfg.time_cond_proj_dim, name="time_embedding"
        )
        return embedding(t_emb, condition)

    def _text_time_embedding(self, text_embeds: jax.Array, time_ids: jax.Array) -> jax.Array:
        """diffusers' "text_time" aug_emb: each id embedded as a timestep (``add_time_proj``), flattened per
        example, after the pooled text embedding, through ``add_embedding``. (B, P), (B, N) -> (B, 4 * C0)."""
        cfg = self.config
        batch, num_ids = time_ids.shape
        time_embeds = get_timestep_embedding(
            time_ids.reshape(-1), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift
        ).reshape(batch, num_ids * cfg.addition_time_embed_dim)
        add_embeds = jnp.concatenate([text_embeds.astype(jnp.float32), time_embeds], axis=-1).astype(self.dtype)
        return TimestepEmbedding(cfg.block_out_channels[0] * 4, dtype=self.dtype, name="add_embedding")(add_embeds)

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array | int | float,
        encoder_hidden_states: jax.Array,
        text_embeds: jax.Array | None = None,
        time_ids: jax.Array | None = None,
        timestep_cond: jax.Array | None = None,
    ) -> jax.Array:
        cfg = self.config
        timesteps = jnp.asarray(timesteps)
        text_embeds, time_ids = (None if x is None else jnp.asarray(x) for x in (text_embeds, time_ids))
        self._check_inputs(sample, timesteps, encoder_hidden_states)
        self._check_added_conditions(sample.shape[0], text_embeds, time_ids)
        groups, eps, n = cfg.norm_num_groups, cfg.norm_eps, len(cfg.block_out_channels)
        common = dict(groups=groups, eps=eps, remat=self.remat, dtype=self.dtype)

        if cfg.center_input_sample:
            sample = 2 * sample - 1.0
        temb = self._time_embedding(timesteps, sample.shape[0], timestep_cond)
        if cfg.addition_embed_type == "text_time":
            temb = temb + self._text_time_embedding(text_embeds, time_ids)
        x = Conv(cfg.block_out_channels[0], (3, 3), padding=1, dtype=self.dtype, name="conv_in")(sample)

        skips = [x]
        for i, (block_type, channels) in enumerate(zip(cfg.down_block_types, cfg.block_out_channels, strict=True)):
            cross = block_type == "CrossAttnDownBlock2D"
            x, block_skips = DownBlock2D(
                channels,
                cfg.layers()[i],
                attentions=tuple(self._transformer_spec(i, d) for d in cfg.down_transformer_depths(i)) if cross else (),
                add_downsample=i < n - 1,
                downsample_padding=cfg.downsample_padding,
                name=f"down_blocks_{i}",
                **common,
            )(x, temb, encoder_hidden_states)
            skips.extend(block_skips)

        x = UNetMidBlock2DCrossAttn(
            self._transformer_spec(n - 1, cfg.mid_transformer_depth()), name="mid_block", **common
        )(x, temb, encoder_hidden_states)

        for i, block_type in enumerate(cfg.up_block_types):
            block = n - 1 - i  # the down block at the same resolution
            channels, num_layers = cfg.block_out_channels[block], cfg.layers()[block] + 1
            cross = block_type == "CrossAttnUpBlock2D"
            block_skips, skips = tuple(skips[-num_layers:]), skips[:-num_layers]
            # Odd sizes halve to ceil(H / 2) on the way down; upsample to the next skip's size, as diffusers does.
            upsample_size = skips[-1].shape[1:3] if i < n - 1 else None
            x = UpBlock2D(
                channels,
                num_layers,
                attentions=tuple(self._transformer_spec(block, d) for d in cfg.up_transformer_depths(i))
                if cross
                else (),
                add_upsample=i < n - 1,
                name=f"up_blocks_{i}",
                **common,
            )(x, block_skips, temb, encoder_hidden_states, upsample_size)

        x = nn.GroupNorm(groups, epsilon=eps, use_fast_variance=False, dtype=self.dtype, name="conv_norm_out")(x)
        return Conv(cfg.out_channels, (3, 3), padding=1, dtype=self.dtype, name="conv_out")(nn.swish(x))
