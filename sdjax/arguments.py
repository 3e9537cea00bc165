"""Checks of generate() arguments shared by every family (one clear PipelineError line each) and the sampler plan
they make; sample.py runs :func:`check_generate_args` before loading a model."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from sdjax import samplers, schedule
from sdjax.errors import PipelineError

OUTPUTS = ("image", "latent")  # what generate() returns: decoded images, or the final diffusion latents
# Largest image side generate() accepts (pixels): SDXL's 1024 four times over; the activations of bigger images
# do not fit an accelerator's memory, and XLA's shape arithmetic overflows far beyond.
MAX_IMAGE_SIDE = 4096
MAX_SEED = 2**63 - 1


def finite_number(name: str, value: Any, low: float, high: float = float("inf"), low_open: bool = False) -> None:
    """PipelineError unless ``value`` is a finite number in [low, high] ((low, high] with ``low_open``). Every range
    is worded the same way: ">= 0" when there is no upper bound, else an interval such as "(0, 1]"."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise PipelineError(f"{name} must be a number, got {value!r}")
    if not (np.isfinite(value) and (low < value if low_open else low <= value) and value <= high):
        raise PipelineError(f"{name} must be a finite number {_range_text(low, high, low_open)}, got {value!r}")


def _range_text(low: float, high: float, low_open: bool = False) -> str:
    if not np.isfinite(high):
        return f"{'>' if low_open else '>='} {low:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}]"


def check_generate_args(
    guidance_scale: Any, eta: Any, strength: Any, seed: Any, num_images: Any, names: dict[str, str] | None = None
) -> None:
    """PipelineError (one line) for a bad generate() argument; sample.py runs it before loading the model, with
    ``names`` mapping an argument to the flag that sets it (``{"strength": "--strength"}``)."""
    names = {} if names is None else names
    finite_number(names.get("guidance_scale", "guidance_scale"), guidance_scale, 0.0)
    finite_number(names.get("eta", "eta"), eta, 0.0)
    finite_number(names.get("strength", "strength"), strength, 0.0, 1.0, low_open=True)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise PipelineError(f"{names.get('seed', 'seed')} must be an int in [0, 2**63 - 1], got {seed!r}")
    if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) or num_images < 1:
        name = names.get("num_images_per_prompt", "num_images_per_prompt")
        raise PipelineError(f"{name} must be an int >= 1, got {num_images!r}")


def check_steps(num_inference_steps: Any, max_steps: int) -> None:
    steps = num_inference_steps
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= max_steps:
        raise PipelineError(
            f"num_inference_steps must be an int in [1, {max_steps}] (the schedule's num_train_timesteps), "
            f"got {steps!r}"
        )


def prompt_list(name: str, prompts: Any) -> list[str]:
    """A string or a non-empty list of strings (valid Unicode text) -> list; PipelineError otherwise."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts) or not prompts:
        raise PipelineError(f"{name} must be a string or a non-empty list of strings, got {prompts!r:.80}")
    for prompt in prompts:
        check_text(name, prompt)
    return list(prompts)


def check_text(name: str, text: str) -> None:
    """PipelineError when ``text`` holds a lone surrogate (a string that is not Unicode text, e.g. made from
    bytes that were not UTF-8, as Python decodes a command line), which no tokenizer can read."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PipelineError(
            f"{name} is not valid text: {text[e.start]!r} at character {e.start} is a lone surrogate (bytes that "
            "were not UTF-8?); pass UTF-8 text"
        ) from None


def negative_prompt_list(negative_prompts: str | list[str] | None, n: int) -> list[str]:
    if negative_prompts is None:
        return [""] * n
    if isinstance(negative_prompts, str):
        return prompt_list("negative_prompts", negative_prompts) * n
    negative_prompts = prompt_list("negative_prompts", negative_prompts)
    if len(negative_prompts) != n:
        raise PipelineError(f"got {len(negative_prompts)} negative prompts for {n} prompts; pass one per prompt")
    return list(negative_prompts)


def repeat(items: list[str], times: int) -> list[str]:
    return [item for item in items for _ in range(times)]


def check_clip_skip(clip_skip: Any, text_encoder: Any) -> int:
    layers = text_encoder.config.num_hidden_layers
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, (int, np.integer)) or not 1 <= clip_skip < layers:
        raise PipelineError(
            f"clip_skip must be None or an int in [1, {layers - 1}] (text encoder layers), got {clip_skip!r}"
        )
    return int(clip_skip)


def call_schedule(cfg: schedule.ScheduleConfig, changes: dict[str, Any] | None) -> schedule.ScheduleConfig:
    """The model's scheduler config with a call's ``scheduler_config`` fields over it; PipelineError if bad."""
    if changes is None:
        return cfg
    try:
        return cfg.updated(changes)
    except ValueError as e:
        raise PipelineError(str(e)) from e


def check_eta(sampler: str, eta: float) -> None:
    record = samplers.REGISTRY.get(sampler)
    if record is not None and record.max_eta is not None and eta > record.max_eta:
        raise PipelineError(f"{sampler} takes eta (its gamma) in [0, {record.max_eta}], got {eta!r}")


@functools.lru_cache(maxsize=32)
def plan(
    cfg: schedule.ScheduleConfig,
    sampler: str,
    steps: int,
    strength: float,
    karras: bool | None,
    denoising_start: float | None = None,
    denoising_end: float | None = None,
):
    if sampler not in samplers.SAMPLERS:
        raise PipelineError(f"unknown sampler {sampler!r}; choose one of: {', '.join(samplers.SAMPLERS)}")
    try:
        return samplers.make_plan(
            cfg,
            sampler,
            steps,
            strength=strength,
            use_karras_sigmas=karras,
            denoising_start=denoising_start,
            denoising_end=denoising_end,
        )
    except ValueError as e:  # one error class for every bad generate() argument
        raise PipelineError(str(e)) from e


def prompt_embeds_pair(prompts: Any, prompt_embeds: Any, negative_prompt_embeds: Any, expected: tuple, dtype: Any):
    """(cond, uncond) text embeddings (B, T, D) given instead of prompts (``expected`` = (T, D)), checked and cast to
    ``dtype``; None where not given. PipelineError (one line) for both prompts and embeddings, or a bad shape."""
    import jax.numpy as jnp

    if prompts is not None and prompt_embeds is not None:
        raise PipelineError(f"pass either prompts or prompt_embeds (B, {expected[0]}, {expected[1]}), not both")
    if prompt_embeds is None:  # prompts are checked as prompts
        if negative_prompt_embeds is not None:
            raise PipelineError("negative_prompt_embeds needs prompt_embeds; with prompts, pass negative_prompts")
        return None, None
    given = [e for e in (prompt_embeds, negative_prompt_embeds) if e is not None]
    for name, e in zip(("prompt_embeds", "negative_prompt_embeds"), given, strict=False):
        shape = np.shape(e)
        if len(shape) != 3 or shape[0] < 1 or shape[1:] != tuple(expected) or not np.isfinite(np.asarray(e)).all():
            raise PipelineError(
                f"{name} must be finite (B, {', '.join(map(str, expected))}) text embeddings, got {shape}"
            )
    if len(given) == 2 and np.shape(given[1]) != np.shape(given[0]):
        raise PipelineError(
            f"negative_prompt_embeds {np.shape(given[1])} must have prompt_embeds' shape {np.shape(given[0])}"
        )
    return tuple(None if e is None else jnp.asarray(e, dtype) for e in (prompt_embeds, negative_prompt_embeds))
