"""Placing data on the local devices for ``jax.pmap``: replicated params, per-device batches."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def _stacked_sharding(devices: list[Any]) -> NamedSharding:
    return NamedSharding(Mesh(np.array(devices), ("devices",)), PartitionSpec("devices"))


def replicate(tree: Any, devices: list[Any] | None = None) -> Any:
    """Copies every leaf to each device: leaf (...) -> (num_devices, ...), one row per device.

    Each device receives its own copy directly (no num_devices-fold array is built on one device), the
    replacement for the deprecated ``jax.device_put_replicated``.
    """
    devices = list(devices or jax.local_devices())
    sharding = _stacked_sharding(devices)

    def put(x: Any) -> jax.Array:
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        rows = [jax.device_put(x[None], d) for d in devices]
        return jax.make_array_from_single_device_arrays((len(devices), *x.shape), sharding, rows)

    return jax.tree.map(put, tree)


def unreplicate(tree: Any) -> Any:
    """Device 0's copy of a replicated tree: (num_devices, ...) -> (...)."""
    return jax.tree.map(lambda x: x[0], tree)
