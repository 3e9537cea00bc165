"""Hooks: how a task (inpainting, ControlNet, ...) takes part in the sampling loop without a loop of its own.

A task gives :func:`sdjax.samplers.sample` a :class:`Hooks` with either or both of

* ``before_model(x_in, row) -> (x_in, extra)``: runs before each model call with the scaled model input
  ``x_in`` (B, H, W, C) and the evaluation's :class:`~sdjax.samplers.plan.Row`; returns the model input (e.g.
  with the mask and masked-image latents concatenated on the channel axis) and a dict of extra keyword inputs
  for the model function (e.g. ControlNet residuals, or what a model function needs to compute them).
* ``after_step(x, row) -> x``: runs after each step with the new latents (float32 (B, H, W, C)); returns them
  adjusted (e.g. 4-channel inpainting: ``(1 - mask) * row.noised_next(init_latents, noise) + mask * x``).

Several tasks compose: ``sample`` takes a sequence of Hooks and applies them in order, each ``before_model``
seeing the previous one's ``x_in``, their extra inputs merged (a key given twice is an error), each ``after_step``
seeing the previous one's ``x``. Hooks run inside the one compiled ``lax.scan``: they must be traceable, and what
they close over (masks, images) should be arrays so that changing them does not recompile.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp

from sdjax.samplers.plan import Row

BeforeModel = Callable[[jnp.ndarray, Row], tuple[jnp.ndarray, dict[str, Any]]]
AfterStep = Callable[[jnp.ndarray, Row], jnp.ndarray]


@dataclasses.dataclass(frozen=True)
class Hooks:
    """A task's part in the loop; either hook may be None."""

    before_model: BeforeModel | None = None
    after_step: AfterStep | None = None


def before_model(hooks: Sequence[Hooks], x_in: jnp.ndarray, row: Row) -> tuple[jnp.ndarray, dict[str, Any]]:
    """Applies every ``before_model`` hook in order: the final model input and the merged extra inputs."""
    extra: dict[str, Any] = {}
    for hook in hooks:
        if hook.before_model is None:
            continue
        x_in, more = hook.before_model(x_in, row)
        clash = sorted(set(extra) & set(more))
        if clash:
            raise ValueError(f"two sampling hooks give the same model input(s) {clash}; combine them in one hook")
        extra.update(more)
    return x_in, extra


def after_step(hooks: Sequence[Hooks], x: jnp.ndarray, row: Row) -> jnp.ndarray:
    """Applies every ``after_step`` hook in order to the latents after a step."""
    for hook in hooks:
        if hook.after_step is not None:
            x = hook.after_step(x, row).astype(jnp.float32)
    return x
