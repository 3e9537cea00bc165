"""The train state (params, EMA params, optimizer state, step) and the optimizer built from a config.

``params`` maps a component name ("vae", "unet", "text_encoder") to the parameter tree of a component being
trained; frozen components are not part of the state. Params and optimizer state are float32 whatever the
compute dtype (float32 master weights).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import struct
from flax.training import train_state

from sdjax import checkpoint, parallel

LR_SCHEDULES = ("cosine", "constant")
Params = dict[str, Any]


class TrainState(train_state.TrainState):
    """flax ``TrainState`` plus ``ema_params`` (None when EMA is off).

    ``step`` counts micro-batches (calls of the train step); with gradient accumulation over k micro-batches the
    optimizer updates params (and the EMA) on every k-th.
    """

    ema_params: Any = None
    accumulation_steps: int = struct.field(pytree_node=False, default=1)


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup from 0 over ``warmup_steps`` optimizer steps, then ``cosine`` decay to 0 at ``steps`` or
    ``constant``. Reads config.optim.{lr, warmup_steps, schedule} and config.steps; returns a float32 schedule."""
    optim = config.optim
    if optim.schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown optim.schedule {optim.schedule!r}; accepted: {', '.join(LR_SCHEDULES)}")
    warmup = max(int(optim.warmup_steps), 0)
    if optim.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, optim.lr, warmup, max(int(config.steps), warmup + 1))
    return optax.join_schedules(
        [optax.linear_schedule(0.0, optim.lr, warmup), optax.constant_schedule(optim.lr)], [warmup]
    )


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW (Loshchilov & Hutter 2019) after global-norm gradient clipping, accumulated over
    ``config.grad_accum_steps`` micro-batches with ``optax.MultiSteps`` when that is > 1.

    Reads config.optim.{lr, warmup_steps, schedule, b1, b2, eps, weight_decay, clip_grad_norm}.
    """
    optim = config.optim
    tx = optax.adamw(
        learning_rate_schedule(config), b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay
    )
    if optim.clip_grad_norm:
        tx = optax.chain(optax.clip_by_global_norm(optim.clip_grad_norm), tx)
    if config.grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps={config.grad_accum_steps}; it must be >= 1")
    if config.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=config.grad_accum_steps)
    return tx


def create_train_state(
    params: Params, tx: optax.GradientTransformation, *, ema: bool, accumulation_steps: int = 1
) -> TrainState:
    """A step-0 state for ``params`` (component name -> float32 tree); ``ema_params`` start as a copy of params."""
    ema_params = jax.tree.map(jnp.array, params) if ema else None
    return TrainState.create(
        apply_fn=None, params=params, tx=tx, ema_params=ema_params, accumulation_steps=accumulation_steps
    )


def ema_decay(num_updates: jax.Array, decay: float, warmup: float) -> jax.Array:
    """EMA decay for the update after ``num_updates`` optimizer updates, as diffusers' ``EMAModel``: 0 for the
    first (the EMA starts at the first updated params), then min(decay, (1 + n) / (warmup + n)).

    The warmup term (diffusers uses warmup=10) keeps early EMA params close to the fast-moving params instead of
    to the random init. Returns a float32 scalar.
    """
    n = jnp.asarray(num_updates, jnp.float32)
    return jnp.where(n > 0, jnp.minimum(decay, (1.0 + n) / (warmup + n)), 0.0)


def update_ema(ema_params: Params, params: Params, decay: jax.Array) -> Params:
    """ema <- decay * ema + (1 - decay) * params, leaf by leaf (float32)."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)


def apply_update(state: TrainState, grads: Params, *, ema_decay_max: float, ema_warmup: float) -> TrainState:
    """One optimizer call: params step (every ``accumulation_steps`` micro-batches) and, when EMA is on, the EMA
    update on the micro-batches where params changed."""
    new_state = state.apply_gradients(grads=grads)
    if state.ema_params is None:
        return new_state
    k = state.accumulation_steps
    updated = (state.step + 1) % k == 0
    decay = ema_decay((state.step + 1) // k - 1, ema_decay_max, ema_warmup)
    ema = update_ema(state.ema_params, new_state.params, jnp.where(updated, decay, 1.0))
    return new_state.replace(ema_params=ema)


# ----------------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(ckpts: checkpoint.Checkpoints, state: TrainState, step: int, rng: jax.Array) -> None:
    """Saves ``state`` (global arrays on the mesh: each process writes its own shards) after optimizer step ``step``
    with the RNG and data position."""
    items = {"params": state.params, "opt_state": state.opt_state}
    if state.ema_params is not None:
        items["ema_params"] = state.ema_params
    meta = {"data_position": int(parallel.to_host(state.step)), "rng": np.asarray(jax.random.key_data(rng)).tolist()}
    ckpts.save(step, items, meta)


def restore_checkpoint(
    ckpts: checkpoint.Checkpoints, target: TrainState, step: int | None = None
) -> tuple[TrainState, int, jax.Array]:
    """(state, optimizer step, rng) from checkpoint ``step`` (default: the latest). ``target`` gives the structure
    and, with ``jax.ShapeDtypeStruct`` leaves that carry shardings, where each array goes: each process then reads
    only its devices' shards, whatever mesh wrote the checkpoint. Numpy-like leaves restore host arrays."""
    targets = {"params": target.params, "opt_state": target.opt_state}
    if target.ema_params is not None:
        targets["ema_params"] = target.ema_params
    items, meta = ckpts.restore(targets, step)
    step = np.int32(meta["data_position"])
    sharding = getattr(target.step, "sharding", None)
    state = target.replace(step=step if sharding is None else parallel.place(step, sharding), **items)
    return state, int(meta["step"]), jax.random.wrap_key_data(np.asarray(meta["rng"], np.uint32))


def restore_newest(ckpts: checkpoint.Checkpoints, target: TrainState) -> tuple[TrainState, int, jax.Array]:
    """:func:`restore_checkpoint` of the newest checkpoint that restores. Newer ones that do not (a truncated or
    damaged file) are moved aside (``Checkpoints.set_aside``: never deleted) with one warning line each; when none
    restores, ``checkpoint.CheckpointError`` names the newest one's error and nothing is moved."""
    failed: list[tuple[int, str]] = []
    for step in reversed(ckpts.all_steps()):
        try:
            restored = restore_checkpoint(ckpts, target, step)
            ok = True
        except Exception as e:  # noqa: BLE001 - Orbax/TensorStore raise bare Exception for unreadable files
            restored, ok = None, False
            failed.append((step, _first_line(e)))
        if jax.process_count() > 1:  # every process must resume from the same step
            from jax.experimental import multihost_utils

            ok = bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))
            if not ok and restored is not None:
                failed.append((step, "it does not restore on another process"))
        if ok:
            break
    else:
        step, error = failed[0]
        raise checkpoint.CheckpointError(
            f"no checkpoint in {ckpts.directory} restores; the newest, step {step}, fails with: {error}. Nothing was "
            "changed: restore the files, or start again with a new --workdir"
        )
    for bad, error in failed:
        if bad > step:
            moved = ckpts.set_aside(bad)
            logging.warning("checkpoint step %d does not restore (%s): moved to %s; resuming from step %d",
                            bad, error, moved, step)  # fmt: skip
    return restored


def _first_line(error: BaseException) -> str:
    # TensorStore wraps the readable cause ("OUT_OF_RANGE: Error reading ... in OCDBT database at ...") in a
    # generic "Encountered error while reading array index" Exception.
    while error.__cause__ is not None:
        error = error.__cause__
    line = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {line[:300]}"
