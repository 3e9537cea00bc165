"""CLIPTextModel and CLIPTextModelWithProjection: the Stable Diffusion text encoders (Radford et al. 2021,
"Learning Transferable Visual Models From Natural Language Supervision", Sec. 2.4), numerically matching
transformers 5's classes of the same names.

A causal pre-LayerNorm transformer over token ids (B, T) -> hidden states (B, T, hidden_size). The module tree
mirrors transformers 5 (``embeddings``, ``encoder.layers_N``, ``final_layer_norm``); checkpoints written by
transformers 4 / Stable Diffusion add a ``text_model.`` prefix, stripped on load. The projection variant (SDXL's
second text encoder, the refiner's only one) adds ``text_projection``, a bias-free Dense on the pooled EOS state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from sdjax.models.config import ModelConfig, UnsupportedConfigError
from sdjax.models.layers import Dense, Dtype, dot_product_attention

ACTIVATIONS = {
    # OpenAI CLIP's sigmoid approximation of GELU (SD 1.x, openai/clip-vit-large-patch14).
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    # Exact erf GELU (SD 2.x, OpenCLIP ViT-H/14), as torch.nn.functional.gelu.
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(ModelConfig):
    """transformers ``CLIPTextConfig``; defaults are transformers' so short config.json files load the same.

    ``projection_dim`` and the special token ids are carried for round trips; the text model itself does not use
    them (SD takes the full sequence of hidden states, not the pooled EOS state).
    """

    class_name: ClassVar[str] = "CLIPTextModel"
    # Dropout is not implemented (SD text encoders use none, shapes64 trains its own without it): only 0.0 is accepted.
    noop_fields: ClassVar[dict[str, Any]] = {"model_type": "clip_text_model", "attention_dropout": 0.0, "dropout": 0.0}
    # Bookkeeping and init-only fields: they never change the forward pass.
    ignored_fields: ClassVar[frozenset[str]] = frozenset(
        {"architectures", "dtype", "torch_dtype", "transformers_version", "initializer_range", "initializer_factor"}
    )

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int | None = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int | None = 49407

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise UnsupportedConfigError(
                f"{self.class_name} hidden_act={self.hidden_act!r} is not supported; "
                f"supported: {', '.join(ACTIVATIONS)}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"{self.class_name} hidden_size={self.hidden_size} must be divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )


@dataclasses.dataclass(frozen=True)
class CLIPTextModelWithProjectionConfig(CLIPTextConfig):
    """The same transformers ``CLIPTextConfig``, read for ``CLIPTextModelWithProjection`` (written back under that
    architecture name); ``projection_dim`` is the width of ``text_embeds`` and must be set."""

    class_name: ClassVar[str] = "CLIPTextModelWithProjection"

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.projection_dim, int) or self.projection_dim < 1:
            raise ValueError(
                f"{self.class_name} projection_dim={self.projection_dim!r}: expected a positive int, the width of "
                "text_embeds"
            )


def _layer_norm(config: CLIPTextConfig, dtype: Dtype, name: str) -> nn.LayerNorm:
    # Two-pass variance, as torch computes it: E[x^2] - E[x]^2 loses digits on CLIP's large activations.
    return nn.LayerNorm(epsilon=config.layer_norm_eps, use_fast_variance=False, dtype=dtype, name=name)


class CLIPTextEmbeddings(nn.Module):
    """Token plus learned absolute position embeddings: ids (B, T) int -> (B, T, hidden_size)."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        cfg = self.config
        tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, name="token_embedding")(input_ids)
        positions = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=self.dtype, name="position_embedding")
        return tokens + positions(jnp.arange(input_ids.shape[-1]))[None]


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention with biased q/k/v/out projections: (B, T, D) -> (B, T, D)."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        heads, dim = cfg.num_attention_heads, cfg.hidden_size

        def proj(name: str) -> jax.Array:
            y = Dense(dim, dtype=self.dtype, name=name)(x)
            return y.reshape(*y.shape[:-1], heads, dim // heads)

        out = dot_product_attention(proj("q_proj"), proj("k_proj"), proj("v_proj"), is_causal=True)
        return Dense(dim, dtype=self.dtype, name="out_proj")(out.reshape(*out.shape[:-2], dim))


class CLIPMLP(nn.Module):
    """fc1 -> activation -> fc2: (B, T, D) -> (B, T, D)."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = Dense(self.config.intermediate_size, dtype=self.dtype, name="fc1")(x)
        x = ACTIVATIONS[self.config.hidden_act](x)
        return Dense(self.config.hidden_size, dtype=self.dtype, name="fc2")(x)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x)). (B, T, D) -> (B, T, D)."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, dtype = self.config, self.dtype
        x = x + CLIPAttention(cfg, dtype, name="self_attn")(_layer_norm(cfg, dtype, "layer_norm1")(x))
        return x + CLIPMLP(cfg, dtype, name="mlp")(_layer_norm(cfg, dtype, "layer_norm2")(x))


class CLIPEncoder(nn.Module):
    """The stack of layers: (B, T, D) -> tuple of num_hidden_layers + 1 hidden states (input first)."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        hidden_states = [x]
        for i in range(self.config.num_hidden_layers):
            hidden_states.append(CLIPEncoderLayer(self.config, self.dtype, name=f"layers_{i}")(hidden_states[-1]))
        return tuple(hidden_states)


class _CLIPTextTransformer(nn.Module):
    """The body both text models share (transformers' ``CLIPTextTransformer``): embeddings, encoder,
    final_layer_norm, and the helpers that work on their outputs."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    torch_ignored_keys: ClassVar[tuple[str, ...]] = (r"(text_model\.)?embeddings\.position_ids",)
    # Stable Diffusion checkpoints (transformers 4 layout) nest everything under text_model.
    torch_key_renames: ClassVar[tuple[tuple[str, str], ...]] = ((r"^text_model\.", ""),)

    def setup(self):
        self.embeddings = CLIPTextEmbeddings(self.config, self.dtype)
        self.encoder = CLIPEncoder(self.config, self.dtype)
        self.final_layer_norm = _layer_norm(self.config, self.dtype, "final_layer_norm")

    def _encode(self, input_ids: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """ids (B, T) -> (last_hidden_state (B, T, D) final-layer-normed, num_hidden_layers + 1 hidden states)."""
        _check_input_ids(input_ids, self.config.max_position_embeddings)
        hidden_states = self.encoder(self.embeddings(input_ids))
        return self.final_layer_norm(hidden_states[-1]), hidden_states

    def pooled_output(self, last_hidden_state: jax.Array, input_ids: jax.Array) -> jax.Array:
        """The hidden state at each sequence's end token, (B, T, D) -> (B, D): transformers' ``pooler_output``
        (SDXL's pooled text embedding). Published configs with the legacy ``eos_token_id`` 2 pool at the argmax
        of the ids (the end token has the largest id in CLIP's vocabulary, unless tokens were added); newer
        configs at the first ``eos_token_id``. Needs no params: ``text_encoder.pooled_output(h, ids)`` works."""
        return pooled_output(self.config, last_hidden_state, input_ids)

    def apply_final_layer_norm(self, hidden_state: jax.Array) -> jax.Array:
        """final_layer_norm on one of the hidden states (B, T, hidden_size), as diffusers does for clip skip."""
        return self.final_layer_norm(hidden_state)

    def dummy_inputs(self) -> tuple[jax.Array]:
        """One token of one sequence, (1, 1) int32: enough to create every parameter."""
        return (jnp.zeros((1, 1), jnp.int32),)


class CLIPTextModel(_CLIPTextTransformer):
    """CLIP text encoder. Usage::

    last_hidden_state = text_encoder.apply({"params": p}, input_ids)             # (B, 77) int32 -> (B, 77, D)
    last, hidden_states = text_encoder.apply({"params": p}, input_ids, output_hidden_states=True)
    # clip skip k (diffusers): text_encoder.apply({"params": p}, hidden_states[-(k + 1)],
    #                                             method=text_encoder.apply_final_layer_norm)
    """

    config_class: ClassVar[type] = CLIPTextConfig
    # Written back with the prefix: transformers 4 needs it and transformers 5 strips it on load.
    torch_export_renames: ClassVar[tuple[tuple[str, str], ...]] = ((r"^", "text_model."),)

    def __call__(
        self, input_ids: jax.Array, output_hidden_states: bool = False
    ) -> jax.Array | tuple[jax.Array, tuple[jax.Array, ...]]:
        """Token ids (B, T) integer, T <= max_position_embeddings -> last_hidden_state (B, T, hidden_size) in the
        compute dtype, after final_layer_norm. Padding after EOS needs no mask: attention is causal.

        With ``output_hidden_states`` also returns, as transformers, the num_hidden_layers + 1 hidden states
        (embeddings output, then each layer's output; none of them final-layer-normed).
        """
        last_hidden_state, hidden_states = self._encode(input_ids)
        if output_hidden_states:
            return last_hidden_state, hidden_states
        return last_hidden_state


class CLIPTextModelWithProjection(_CLIPTextTransformer):
    """CLIP text encoder with the text projection (transformers ``CLIPTextModelWithProjection``; SDXL's
    ``text_encoder_2`` and the refiner's text encoder). Usage::

    text_embeds, last = text_encoder.apply({"params": p}, input_ids)       # (B, projection_dim), (B, T, D)
    text_embeds, last, hidden_states = text_encoder.apply({"params": p}, input_ids, output_hidden_states=True)
    # SDXL's prompt embedding is hidden_states[-2] (penultimate layer, not final-layer-normed).
    """

    config: CLIPTextModelWithProjectionConfig

    config_class: ClassVar[type] = CLIPTextModelWithProjectionConfig
    # text_model.* as transformers writes it; text_projection sits beside text_model, not in it.
    torch_export_renames: ClassVar[tuple[tuple[str, str], ...]] = ((r"^(?!text_projection\.)", "text_model."),)

    def setup(self):
        super().setup()
        self.text_projection = Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype)

    def __call__(
        self, input_ids: jax.Array, output_hidden_states: bool = False
    ) -> tuple[jax.Array, jax.Array] | tuple[jax.Array, jax.Array, tuple[jax.Array, ...]]:
        """Token ids (B, T) integer -> (text_embeds (B, projection_dim), last_hidden_state (B, T, hidden_size)),
        both in the compute dtype. ``text_embeds`` is text_projection of :meth:`pooled_output`.

        With ``output_hidden_states`` also returns the num_hidden_layers + 1 hidden states, as ``CLIPTextModel``.
        """
        last_hidden_state, hidden_states = self._encode(input_ids)
        text_embeds = self.text_projection(self.pooled_output(last_hidden_state, input_ids))
        if output_hidden_states:
            return text_embeds, last_hidden_state, hidden_states
        return text_embeds, last_hidden_state


def eos_positions(config: CLIPTextConfig, input_ids: jax.Array) -> jax.Array:
    """Index of each sequence's end token, int (B,), by transformers' rule (see ``CLIPTextModel.pooled_output``)."""
    if config.eos_token_id == 2 or config.eos_token_id is None:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax((input_ids == config.eos_token_id).astype(jnp.int32), axis=-1)


def pooled_output(config: CLIPTextConfig, last_hidden_state: jax.Array, input_ids: jax.Array) -> jax.Array:
    """(B, T, D) hidden states, (B, T) ids -> (B, D): the state at :func:`eos_positions`."""
    index = eos_positions(config, input_ids)
    return jnp.take_along_axis(last_hidden_state, index[:, None, None], axis=1)[:, 0]


def _check_input_ids(input_ids: jax.Array, max_length: int) -> None:
    if input_ids.ndim != 2 or input_ids.shape[1] > max_length or not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(
            f"CLIPTextModel input_ids have shape {tuple(input_ids.shape)} and dtype {input_ids.dtype}; expected "
            f"integer token ids (B, T) with T <= max_position_embeddings={max_length}"
        )
