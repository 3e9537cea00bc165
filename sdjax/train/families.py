"""What differs between model families in diffusion training: the UNet's conditioning of a batch, the batch
features it needs, and the pipeline that previews the run. Noise, timesteps, loss, EMA, checkpoints and the
preview's grid are shared (:mod:`sdjax.train.diffusion_stage`).

- "sd" (1.x / 2.x): ``encoder_hidden_states`` = the text encoder's last hidden state of ``input_ids``.
- "sdxl" (Podell et al. 2023): both text encoders' penultimate hidden states, concatenated (B, 77, D1 + D2);
  ``text_embeds`` = the second encoder's projected pooled output (B, P); ``time_ids`` (B, 6) = original size
  (h, w) + crop top-left (top, left) + target size (h, w), as diffusers' train_text_to_image_sdxl.py builds them
  from the sizes the input pipeline records per example. Empty captions (caption dropout) get zero
  ``encoder_hidden_states`` and ``text_embeds`` when the model's ``force_zeros_for_empty_prompt`` is set (the SDXL
  base's): the unconditional input the pipeline samples with, as SDXL's original training zeroed dropped
  conditionings; their time ids stay.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from sdjax.train.checks import TrainConfigError

Params = dict[str, Any]
Batch = dict[str, jax.Array]
Conditions = Callable[[Any, Params, Params, Batch], dict[str, jax.Array]]


@dataclasses.dataclass(frozen=True)
class Family:
    """conditions(model, params, frozen, batch) -> the UNet's keyword inputs (traced inside the train step);
    batch_options(model) -> the input pipeline's extra arguments (:func:`sdjax.data.input_pipeline.make_dataset`);
    pipeline(model) -> the sampling pipeline over the run's modules (params set by the caller)."""

    name: str
    conditions: Conditions
    batch_options: Callable[[Any], dict[str, Any]]
    pipeline: Callable[[Any], Any]


def _params(name: str, params: Params, frozen: Params) -> Params:
    return params[name] if name in params else frozen[name]


def sd_conditions(model: Any, params: Params, frozen: Params, batch: Batch) -> dict[str, jax.Array]:
    """{"encoder_hidden_states": (B, 77, D)}: the (trained or frozen) text encoder's last hidden state."""
    from sdjax import conditioning

    encoder, encoder_params = model.modules["text_encoder"], _params("text_encoder", params, frozen)
    return {"encoder_hidden_states": conditioning.sd_text(encoder, encoder_params, batch["input_ids"])}


def sdxl_time_ids(original_size: jax.Array, crop_top_left: jax.Array, target_size: tuple[int, int]) -> jax.Array:
    """SDXL base micro-conditioning per example: int (B, 2) original (h, w), (B, 2) crop (top, left) and the
    target (h, w) -> float32 (B, 6), in diffusers' order (original_size + crops_coords_top_left + target_size)."""
    target = jnp.broadcast_to(jnp.asarray(target_size, jnp.float32), original_size.shape)
    return jnp.concatenate([original_size.astype(jnp.float32), crop_top_left.astype(jnp.float32), target], axis=-1)


def empty_captions(model: Any, input_ids: jax.Array) -> jax.Array:
    """bool (B,): which rows of ``input_ids`` (B, 77) are the empty caption (<bos> directly followed by <eos>)."""
    return input_ids[:, 1] == model.tokenizer.eos_token_id


def sdxl_conditions(model: Any, params: Params, frozen: Params, batch: Batch) -> dict[str, jax.Array]:
    """{"encoder_hidden_states": (B, 77, D1 + D2), "text_embeds": (B, P), "time_ids": (B, 6) float32} of a batch
    with "input_ids", "input_ids_2", "original_size", "crop_top_left" and "image" (its size is the target)."""
    from sdjax import conditioning

    names = (("text_encoder", "input_ids"), ("text_encoder_2", "input_ids_2"))
    states, pooled = conditioning.sdxl_text(
        [(model.modules[name], _params(name, params, frozen), batch[key], -2) for name, key in names]
    )
    if model.options.get("force_zeros_for_empty_prompt", True):
        states, pooled = conditioning.zero_dropped(~empty_captions(model, batch["input_ids"]), states, pooled)
    target = tuple(batch["image"].shape[1:3])
    time_ids = sdxl_time_ids(batch["original_size"], batch["crop_top_left"], target)
    return {"encoder_hidden_states": states, "text_embeds": pooled, "time_ids": time_ids}


def _sd_pipeline(model: Any) -> Any:
    from sdjax.pipeline import StableDiffusion

    return StableDiffusion(
        **model.modules, params=dict(model.frozen), tokenizer=model.tokenizer, schedule=model.schedule,
        scheduler_class=model.scheduler_class,
    )  # fmt: skip


def _sdxl_pipeline(model: Any) -> Any:
    from sdjax.sdxl import StableDiffusionXL

    return StableDiffusionXL(
        unet=model.modules["unet"], vae=model.modules["vae"], text_encoder=model.modules.get("text_encoder"),
        text_encoder_2=model.modules["text_encoder_2"], params=dict(model.frozen),
        tokenizers={"tokenizer": model.tokenizer, "tokenizer_2": model.tokenizer_2}, schedule=model.schedule,
        scheduler_class=model.scheduler_class, **model.options,
    )  # fmt: skip


FAMILIES = {
    "sd": Family("sd", sd_conditions, lambda model: {}, _sd_pipeline),
    "sdxl": Family(
        "sdxl",
        sdxl_conditions,
        lambda model: {"tokenizer_2": model.tokenizer_2, "record_sizes": True},
        _sdxl_pipeline,
    ),
}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise TrainConfigError(f"unknown model family {name!r}; accepted: {', '.join(FAMILIES)}")
    return FAMILIES[name]
