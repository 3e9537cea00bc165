"""Update and evaluation steps built from a stage's loss. They are plain functions of global arrays: placing them
on devices (``jax.jit`` over the mesh, shardings, donation) is :mod:`sdjax.parallel`'s.

A stage's loss is ``loss_fn(params, frozen, batch, rng, step) -> (loss, metrics)``:
  params: component name -> params being trained (float32); frozen: name -> params of the frozen components;
  batch: {"image": (B, H, W, 3) float32 in [-1, 1], "input_ids": (B, 77) int32}, the global batch;
  rng: the run's key; step: the data position (micro-batches seen), which seeds this batch's randomness.
The update step takes (state, frozen, batch, rng) and returns (state, metrics); the evaluation step takes
(params, frozen, batch, rng) and returns metrics. Losses and metrics are means over the global batch: however
the batch is split over devices, XLA reduces the gradients (no hand-written collective).

Randomness: the step key is ``fold_in(rng, step)``; each example then gets ``fold_in(step_key, global index)``,
its row in the global batch. Every example thus sees the same noise however the global batch is split over
devices (and hosts), so 1 device, N data-parallel devices and any fsdp layout make the same update.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from sdjax.train.state import TrainState, apply_update

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
LossFn = Callable[[dict, dict, Batch, jax.Array, jax.Array], tuple[jax.Array, Metrics]]
StepFn = Callable[[TrainState, dict, Batch, jax.Array], tuple[TrainState, Metrics]]
EvalFn = Callable[[dict, dict, Batch, jax.Array], Metrics]
EVAL_STREAM = 0x5EED  # evaluation draws its noise from fold_in(rng, EVAL_STREAM): never a training batch's


def example_keys(rng: jax.Array, step: jax.Array, batch_size: int, num_streams: int) -> jax.Array:
    """Per-example keys, independent of the device layout: (num_streams, B) keys (one stream per random
    quantity) for the B examples of the global batch, example i's from its index i."""
    step_key = jax.random.fold_in(rng, step)
    index = jnp.arange(batch_size)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(step_key, index)
    return jax.vmap(lambda k: jax.random.split(k, num_streams), out_axes=1)(keys)


def normal(keys: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """One standard-normal float32 draw of ``shape`` per key: (B,) keys -> (B, *shape)."""
    return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)


def make_train_step(loss_fn: LossFn, config: ml_collections.ConfigDict) -> StepFn:
    """The update step of ``loss_fn``: gradients of the global batch's mean loss, optimizer and EMA update
    (config.ema_decay, config.ema_warmup). Metrics: the loss's, plus grad_norm."""

    def step(state: TrainState, frozen: dict, batch: Batch, rng: jax.Array) -> tuple[TrainState, Metrics]:
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, metrics), grads = grad_fn(state.params, frozen, batch, rng, state.step)
        metrics = {**metrics, "grad_norm": optax.global_norm(grads)}
        state = apply_update(state, grads, ema_decay_max=config.ema_decay, ema_warmup=config.ema_warmup)
        return state, metrics

    return step


def make_eval_step(loss_fn: LossFn) -> EvalFn:
    """The evaluation step of ``loss_fn``: its metrics on a batch, no gradients, the same noise at every call."""

    def step(params: dict, frozen: dict, batch: Batch, rng: jax.Array) -> Metrics:
        _, metrics = loss_fn(params, frozen, batch, jax.random.fold_in(rng, EVAL_STREAM), jnp.int32(0))
        return metrics

    return step
