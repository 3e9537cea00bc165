"""Each family's prompt -> UNet conditioning, from token ids: the one place sampling (:mod:`sdjax.pipeline`,
:mod:`sdjax.sdxl`) and training (:mod:`sdjax.train.families`) encode text.

- SD 1.x / 2.x: ``encoder_hidden_states`` = the text encoder's last hidden state (or, with clip skip, an earlier
  hidden state then the final layer norm).
- SDXL (Podell et al. 2023): each text encoder's penultimate hidden state, concatenated on the feature axis
  (B, 77, D1 + D2), and ``text_embeds`` = the projected pooled output of the encoder that has a projection
  (OpenCLIP ViT-bigG); a dropped / empty prompt may get zeros for both (``force_zeros_for_empty_prompt``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp


@functools.partial(jax.jit, static_argnums=(0, 3))
def sd_text(text_encoder: Any, params: Any, input_ids: jax.Array, layer: int | None = None) -> jax.Array:
    """Token ids (B, T) -> (B, T, D): the last hidden state, or hidden state ``layer`` then the final layer norm."""
    if layer is None:
        return text_encoder.apply({"params": params}, input_ids)
    _, hidden_states = text_encoder.apply({"params": params}, input_ids, output_hidden_states=True)
    return text_encoder.apply({"params": params}, hidden_states[layer], method=text_encoder.apply_final_layer_norm)


@functools.partial(jax.jit, static_argnums=(0, 3))
def hidden_and_pooled(encoder: Any, params: Any, ids: jax.Array, layer: int) -> tuple[jax.Array, Any]:
    """Token ids (B, 77) -> (hidden state ``layer`` (B, 77, D), projected pooled output (B, P) or None for an
    encoder without projection)."""
    out = encoder.apply({"params": params}, ids, output_hidden_states=True)
    if len(out) == 3:  # CLIPTextModelWithProjection: (text_embeds, last_hidden_state, hidden_states)
        return out[2][layer], out[0]
    return out[1][layer], None


def sdxl_text(encoders: Sequence[tuple[Any, Any, jax.Array, int]]) -> tuple[jax.Array, jax.Array]:
    """SDXL's text conditioning from (encoder, params, token ids (B, 77), layer) per text encoder present (the
    refiner has only the second) -> (encoder_hidden_states (B, 77, sum D), text_embeds (B, P))."""
    hidden, pooled = [], None
    for encoder, params, ids, layer in encoders:
        states, projected = hidden_and_pooled(encoder, params, ids, layer)
        hidden.append(states)
        pooled = projected if projected is not None else pooled
    return jnp.concatenate(hidden, axis=-1), pooled


def zero_dropped(keep: jax.Array, states: jax.Array, pooled: jax.Array) -> tuple[jax.Array, jax.Array]:
    """SDXL's unconditional input for the rows where ``keep`` (B,) is False: zero states and pooled embeddings."""
    states = jnp.where(keep[:, None, None], states, 0.0).astype(states.dtype)
    return states, jnp.where(keep[:, None], pooled, 0.0).astype(pooled.dtype)
