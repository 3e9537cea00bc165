"""Each family's prompt -> UNet conditioning, from token ids: the one place sampling (:mod:`sdjax.pipeline`,
:mod:`sdjax.sdxl`) and training (:mod:`sdjax.train.families`) encode text.

- SD 1.x / 2.x: ``encoder_hidden_states`` = the text encoder's last hidden state (or, with clip skip, an earlier
  hidden state then the final layer norm).
- SDXL (Podell et al. 2023): each text encoder's penultimate hidden state, concatenated on the feature axis
  (B, 77, D1 + D2), and ``text_embeds`` = the projected pooled output of the encoder that has a projection
  (OpenCLIP ViT-bigG); a dropped / empty prompt may get zeros for both (``force_zeros_for_empty_prompt``);
  ``time_ids``, the "micro-conditioning": original size, crop corner and target size (base) or aesthetic score
  (refiner), as diffusers' SDXL pipelines make them from the generate() arguments.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.errors import PipelineError


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


def sdxl_time_ids(
    original_size: tuple, crops_coords_top_left: tuple, last: tuple, unet_config: Any, pooled_dim: int, aesthetic: bool
) -> np.ndarray:
    """SDXL's micro-conditioning (6,) base / (5,) refiner float32: original (h, w), crop (top, left), then the
    target (h, w) (base) or the aesthetic score (refiner, ``aesthetic``); checked against the UNet's
    ``add_embedding`` (``pooled_dim``: the text_embeds width)."""
    ids = np.asarray([*original_size, *crops_coords_top_left, *last], np.float32)
    cfg = unet_config
    if cfg.addition_embed_type != "text_time":
        raise PipelineError(f"this UNet has addition_embed_type={cfg.addition_embed_type!r}; SDXL's is 'text_time'")
    expected = (cfg.projection_class_embeddings_input_dim - pooled_dim) / cfg.addition_time_embed_dim
    if len(ids) != expected:
        kind = "aesthetic score" if aesthetic else "target size"
        raise PipelineError(
            f"the UNet expects {expected:g} time ids, the pipeline makes {len(ids)} (original size, crop, "
            f"{kind}): requires_aesthetics_score={aesthetic} in model_index.json does not fit this UNet"
        )
    return ids


def added_time_ids(
    make: Any, size: tuple[int, int], img2img: bool, micro: dict[str, Any], aesthetic: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(positive, negative) time ids, ``make(original, crop, last)`` each, as diffusers' SDXL pipelines make them
    from ``micro`` (the generate() arguments; sizes default to ``size``): txt2img's negative ones differ only when
    both negative sizes are given; img2img / inpainting's negative fields default to the positive ones."""
    original = _pair("original_size", micro["original_size"] or size)
    target = _pair("target_size", micro["target_size"] or size)
    crop = _pair("crops_coords_top_left", micro["crops_coords_top_left"])
    negative_crop = _pair("negative_crops_coords_top_left", micro["negative_crops_coords_top_left"])
    negative_original, negative_target = micro["negative_original_size"], micro["negative_target_size"]
    if aesthetic:
        scores = [_score(micro, "aesthetic_score"), _score(micro, "negative_aesthetic_score")]
        negative_original = _pair("negative_original_size", negative_original or original)
        return make(original, crop, (scores[0],)), make(negative_original, negative_crop, (scores[1],))
    positive = make(original, crop, target)
    if img2img:  # diffusers' img2img pairs the negative sizes with the positive crop
        negative_original = _pair("negative_original_size", negative_original or original)
        negative_target = _pair("negative_target_size", negative_target or target)
        return positive, make(negative_original, crop, negative_target)
    if negative_original is None or negative_target is None:
        return positive, positive
    negative = (_pair("negative_original_size", negative_original), negative_crop)
    return positive, make(*negative, _pair("negative_target_size", negative_target))


def _pair(name: str, value: Any) -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2 or not all(_is_number(v) for v in value):
        raise PipelineError(f"{name} must be a pair of numbers (pixels), got {value!r}")
    return float(value[0]), float(value[1])


def _score(micro: dict[str, Any], name: str) -> float:
    if not _is_number(micro[name]):
        raise PipelineError(f"{name} must be a finite number, got {micro[name]!r}")
    return float(micro[name])


def _is_number(value: Any) -> bool:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    return ok and bool(np.isfinite(value))


def sdxl_conditions(
    encode: Any, texts: tuple, guided: bool, time_ids: tuple[np.ndarray, np.ndarray], force_zeros: bool
) -> dict[str, Any]:
    """The UNet's inputs {"cond": {...}, "uncond": {...}} (``encoder_hidden_states``, ``text_embeds``,
    ``time_ids`` (B, 5 or 6)) for B prompts: ``texts`` = (prompts, prompts_2, negative_prompts,
    negative_prompts_2) lists (None: not given), ``encode(prompts, prompts_2)`` -> (states, pooled). With no
    negative prompts and ``force_zeros`` (``force_zeros_for_empty_prompt``) the negative embeddings are zeros,
    as diffusers."""
    prompts, prompts_2, negatives, negatives_2 = texts
    n = len(prompts)
    states, pooled = encode(prompts, prompts_2)
    out = {"cond": {"encoder_hidden_states": states, "text_embeds": pooled, "time_ids": _rows(time_ids[0], n)}}
    if guided:
        if negatives is None and force_zeros:
            neg_states, neg_pooled = jnp.zeros_like(states), jnp.zeros_like(pooled)
        else:
            negatives = negatives or [""] * n
            neg_states, neg_pooled = encode(negatives, negatives_2 or negatives)
        out["uncond"] = {
            "encoder_hidden_states": neg_states,
            "text_embeds": neg_pooled,
            "time_ids": _rows(time_ids[1], n),
        }
    return out


def _rows(time_ids: np.ndarray, n: int) -> jax.Array:
    return jnp.broadcast_to(jnp.asarray(time_ids), (n, time_ids.shape[0]))
