"""The encoder half of the SD UNet, shared by the UNet and the ControlNet: the timestep (and SDXL's added
"text_time") embedding, ``conv_in``, the down blocks and the mid block.

:class:`sdjax.models.unet.UNet2DConditionModel` runs it and then its up path; a ControlNet
(:class:`sdjax.models.controlnet.ControlNetModel`, Zhang et al. 2023, "Adding Conditional Control to Text-to-Image
Diffusion Models") runs the same code on the latents plus an embedded control image and returns zero-conv
projections of its skip connections and mid-block output, which the UNet adds to its own.

:class:`UNetEncoder` is not a flax module: called inside a module's compact ``__call__``, the layers it creates
belong to that module, so both networks keep diffusers' parameter names (``conv_in``, ``time_embedding``,
``add_embedding``, ``down_blocks_N``, ``mid_block``) at their top level and weights convert by renaming.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from sdjax.models.config import ModelConfig, UnsupportedConfigError
from sdjax.models.embeddings import TimestepEmbedding, get_timestep_embedding
from sdjax.models.layers import Conv
from sdjax.models.transformer import TransformerSpec
from sdjax.models.unet_blocks import DownBlock2D, UNetMidBlock2DCrossAttn

_DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn",)
_ADDITION_EMBED_TYPES = (None, "text_time")

# Fields diffusers' UNet and ControlNet configs carry, accepted at the value that turns the feature off.
ENCODER_NOOP_FIELDS: dict[str, Any] = {
    "only_cross_attention": False,
    "mid_block_scale_factor": 1.0,
    "act_fn": "silu",
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "class_embed_type": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "addition_embed_type_num_heads": 64,
}


@dataclasses.dataclass(frozen=True)
class UNetEncoderConfig(ModelConfig):
    """The fields of diffusers' ``UNet2DConditionModel`` and ``ControlNetModel`` configs that shape the encoder
    half (SD 1.x / 2.x / XL subset); defaults are diffusers' defaults. Subclassed by both networks' configs.

    As in diffusers, ``attention_head_dim`` is really the number of heads per block unless
    ``num_attention_heads`` is given (a historical misnaming); each head has ``channels // heads`` dims.
    ``transformer_layers_per_block`` (BasicTransformerBlocks per Transformer2DModel) is an int, one int per
    down block, or per down block a list with one depth per layer.
    ``addition_embed_type="text_time"`` (SDXL) adds ``add_embedding`` from ``projection_class_embeddings_input_dim``
    = pooled text width + number of time ids * ``addition_time_embed_dim``.
    """

    in_channels: int = 4
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 1280
    transformer_layers_per_block: int | tuple[int | tuple[int, ...], ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    upcast_attention: bool | None = False  # SDXL publishes null: off, as diffusers reads it
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

    # (field, accepted values) checked in __post_init__; fields with one entry per down block.
    supported_values: ClassVar[tuple[tuple[str, tuple], ...]] = (
        ("down_block_types", _DOWN_BLOCK_TYPES),
        ("mid_block_type", _MID_BLOCK_TYPES),
        ("downsample_padding", (0, 1)),
        ("addition_embed_type", _ADDITION_EMBED_TYPES),
    )
    per_block_fields: ClassVar[tuple[str, ...]] = (
        "down_block_types",
        "layers_per_block",
        "cross_attention_dim",
        "transformer_layers_per_block",
        "attention_head_dim",
        "num_attention_heads",
    )

    def __post_init__(self):
        self._check_supported()
        self._check_per_block()
        self._check_transformer_depths()
        self._check_text_time()

    def _check_supported(self) -> None:
        unsupported = [
            f"{name}={value!r} (supported: {', '.join(map(str, allowed))})"
            for name, allowed in self.supported_values
            for value in (lambda v: v if isinstance(v, tuple) else (v,))(getattr(self, name))
            if value not in allowed
        ]
        if unsupported:
            raise UnsupportedConfigError(f"{self.class_name} config not supported: {'; '.join(unsupported)}")

    def _check_per_block(self) -> None:
        n = len(self.block_out_channels)
        for name in self.per_block_fields:
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != n:
                raise ValueError(
                    f"{self.class_name} config: {name} has {len(value)} entries but block_out_channels has {n}; "
                    "give one entry per block or a single int"
                )

    def _check_transformer_depths(self) -> None:
        self._check_depths(
            "transformer_layers_per_block", self._per_block(self.transformer_layers_per_block), self.layers()
        )

    def _check_depths(self, name: str, entries: tuple, block_layers: tuple[int, ...]) -> None:
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

    def cross_attention_dims(self) -> tuple[int, ...]:
        """Context feature size expected by each down block's cross-attention."""
        return self._per_block(self.cross_attention_dim)

    def skip_channels(self) -> tuple[int, ...]:
        """Channels of each skip connection the encoder half produces, in order: ``conv_in``'s output, then each
        down block's layers and its downsampler (none after the last block). A ControlNet returns one residual
        per entry."""
        channels = [self.block_out_channels[0]]
        last = len(self.block_out_channels) - 1
        for i, (width, layers) in enumerate(zip(self.block_out_channels, self.layers(), strict=True)):
            channels += [width] * (layers + (i < last))
        return tuple(channels)

    def transformer_spec(self, block: int, depth: int) -> TransformerSpec:
        """The Transformer2DModel settings of block ``block`` (its channels and heads) with ``depth`` layers."""
        heads = self.heads()[block]
        return TransformerSpec(
            heads=heads,
            dim_head=self.block_out_channels[block] // heads,
            depth=depth,
            use_linear_projection=self.use_linear_projection,
            upcast_attention=bool(self.upcast_attention),
        )


@dataclasses.dataclass(frozen=True)
class UNetEncoder:
    """The encoder half's layers and checks, built inside the compact ``__call__`` of the module that owns them.

    ``name`` is how errors call the network ("UNet", "ControlNet"); ``remat`` recomputes ResNet and transformer
    blocks in the backward pass."""

    config: UNetEncoderConfig
    dtype: Any = jnp.float32
    remat: bool = False
    name: str = "UNet"

    def dummy_inputs(self) -> tuple[jax.Array, ...]:
        """Smallest (sample, timesteps, encoder_hidden_states[, text_embeds, time_ids]) whose ``init`` creates every
        parameter. A text_time network gets one time id and the rest of ``projection_class_embeddings_input_dim``
        as text_embeds: only their total width shapes ``add_embedding``."""
        cfg = self.config
        size = 2 ** (len(cfg.block_out_channels) - 1)
        inputs = (
            jnp.zeros((1, size, size, cfg.in_channels), jnp.float32),
            jnp.zeros((1,), jnp.float32),
            jnp.zeros((1, 1, cfg.cross_attention_dims()[0]), jnp.float32),
        )
        if cfg.addition_embed_type != "text_time":
            return inputs
        pooled = cfg.projection_class_embeddings_input_dim - cfg.addition_time_embed_dim
        return (*inputs, jnp.zeros((1, pooled), jnp.float32), jnp.zeros((1, 1), jnp.float32))

    def check_inputs(
        self,
        sample: jax.Array,
        timesteps: jax.Array,
        context: jax.Array,
        text_embeds: jax.Array | None,
        time_ids: jax.Array | None,
    ) -> None:
        """ValueError (one line) unless the inputs fit the config (shapes as :meth:`__call__` of the network)."""
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
        self._check_added_conditions(batch, text_embeds, time_ids)

    def _check_added_conditions(self, batch: int, text_embeds: jax.Array | None, time_ids: jax.Array | None) -> None:
        cfg = self.config
        given = [name for name, x in (("text_embeds", text_embeds), ("time_ids", time_ids)) if x is not None]
        if cfg.addition_embed_type != "text_time":
            if given:
                raise ValueError(
                    f"{' and '.join(given)} given to a {self.name} with addition_embed_type="
                    f"{cfg.addition_embed_type!r}; only addition_embed_type='text_time' (SDXL) networks take "
                    "text_embeds and time_ids"
                )
            return
        expected = (
            f"text_embeds (batch={batch}, P) and time_ids (batch={batch}, N) with P + N * "
            f"{cfg.addition_time_embed_dim} = {cfg.projection_class_embeddings_input_dim} (SDXL base: P=1280, N=6; "
            "refiner: P=1280, N=5)"
        )
        if len(given) < 2:
            raise ValueError(
                f"this {self.name} has addition_embed_type='text_time' and needs {expected}; got "
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
                f"this {self.name} needs {expected}; got text_embeds {tuple(text_embeds.shape)} and time_ids "
                f"{tuple(time_ids.shape)}"
            )

    def embed_time(
        self,
        timesteps: jax.Array,
        batch: int,
        text_embeds: jax.Array | None = None,
        time_ids: jax.Array | None = None,
    ) -> jax.Array:
        """``time_embedding`` of the (scalar, (1,) or (B,)) timesteps, plus, for a "text_time" config,
        ``add_embedding`` of the pooled text and time ids: (B, 4 * block_out_channels[0]) in ``dtype``."""
        cfg = self.config
        timesteps = jnp.broadcast_to(timesteps.reshape(-1), (batch,))
        t_emb = get_timestep_embedding(
            timesteps, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift
        ).astype(self.dtype)
        temb = TimestepEmbedding(cfg.block_out_channels[0] * 4, dtype=self.dtype, name="time_embedding")(t_emb)
        if cfg.addition_embed_type == "text_time":
            temb = temb + self._text_time_embedding(text_embeds, time_ids)
        return temb

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

    def conv_in(self, sample: jax.Array) -> jax.Array:
        """(B, H, W, in_channels) -> (B, H, W, block_out_channels[0])."""
        return Conv(self.config.block_out_channels[0], (3, 3), padding=1, dtype=self.dtype, name="conv_in")(sample)

    def down(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        """The down blocks on ``conv_in``'s output x (B, H, W, C0): (the lowest resolution's activations, every
        skip connection in order, x itself first; channels as :meth:`UNetEncoderConfig.skip_channels`)."""
        cfg = self.config
        n = len(cfg.block_out_channels)
        skips = [x]
        for i, (block_type, channels) in enumerate(zip(cfg.down_block_types, cfg.block_out_channels, strict=True)):
            depths = cfg.down_transformer_depths(i) if block_type == "CrossAttnDownBlock2D" else ()
            x, block_skips = DownBlock2D(
                channels,
                cfg.layers()[i],
                attentions=tuple(cfg.transformer_spec(i, d) for d in depths),
                add_downsample=i < n - 1,
                downsample_padding=cfg.downsample_padding,
                groups=cfg.norm_num_groups,
                eps=cfg.norm_eps,
                remat=self.remat,
                dtype=self.dtype,
                name=f"down_blocks_{i}",
            )(x, temb, context)
            skips.extend(block_skips)
        return x, skips

    def mid(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
        """The mid block at the lowest resolution: (B, h, w, C) -> (B, h, w, C)."""
        cfg = self.config
        spec = cfg.transformer_spec(len(cfg.block_out_channels) - 1, cfg.mid_transformer_depth())
        return UNetMidBlock2DCrossAttn(
            spec, cfg.norm_num_groups, cfg.norm_eps, self.remat, dtype=self.dtype, name="mid_block"
        )(x, temb, context)
