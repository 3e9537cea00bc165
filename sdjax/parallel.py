"""Placing data on the local devices for ``jax.pmap``: replicated params, per-device batches, and back."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "batch"  # the pmap axis name of every sdjax collective (lax.pmean, lax.axis_index)


def replicate(tree: Any, devices: list[Any] | None = None) -> Any:
    """Copies every leaf to each device: leaf (...) -> (num_devices, ...), one row per device.

    Laid out as a pmapped function lays out its outputs, so feeding a pmapped step its own outputs never
    recompiles it. Each device receives its copy directly: no num_devices-fold array is built in host or device
    memory (the replacement for the deprecated ``jax.device_put_replicated``).
    """
    devices = list(devices or jax.local_devices())
    sharding = NamedSharding(Mesh(np.asarray(devices), (AXIS,)), PartitionSpec(AXIS))

    def put(x: Any) -> jax.Array:
        x = x if isinstance(x, jax.Array) else np.asarray(x)
        rows = [jax.device_put(x[None], d) for d in devices]
        return jax.make_array_from_single_device_arrays((len(devices), *x.shape), sharding, rows)

    return jax.tree.map(put, tree)


def unreplicate(tree: Any) -> Any:
    """This host's first copy of a replicated tree as numpy: (num_devices, ...) -> (...). Works on multi-host
    pmap outputs too (``addressable_data(0)``: every host holds full copies)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0))[0], tree)


def shard(x: Any, num_devices: int, per_device: int) -> jax.Array:
    """(N, ...) -> (num_devices, per_device, ...), padding N up to num_devices * per_device by repeating the last
    row (the caller drops the padded outputs)."""
    x = jnp.asarray(x)
    pad = num_devices * per_device - x.shape[0]
    if pad:
        x = jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)])
    return x.reshape(num_devices, per_device, *x.shape[1:])
