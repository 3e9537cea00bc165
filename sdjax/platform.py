"""Per-platform choices: the XLA:CPU flags entry points set, and the dtype networks compute in on the CPU.

Importing sdjax changes no global state: only ``sample.py``, ``train.py`` and the benchmarks call
:func:`configure_cpu`, first thing. :func:`compute_dtype` is read by the networks while they are traced.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

# Measured by benchmarks/profile_unet.py and bench_unet.py on a 2-core AVX-512 Xeon (see the README's Benchmarks).
CPU_XLA_FLAGS: tuple[str, ...] = ()


def configure_cpu() -> str | None:
    """Sets ``XLA_FLAGS`` to :data:`CPU_XLA_FLAGS` when the user has not set ``XLA_FLAGS`` and JAX has not started.

    The flags are all ``--xla_cpu_*``: they change only XLA:CPU compilations, so a GPU/TPU run is unaffected.
    Returns the value set, or None when nothing was changed.
    """
    import sys

    if "XLA_FLAGS" in os.environ or not CPU_XLA_FLAGS or _backend_started(sys.modules.get("jax")):
        return None
    os.environ["XLA_FLAGS"] = " ".join(CPU_XLA_FLAGS)
    return os.environ["XLA_FLAGS"]


def _backend_started(jax_module) -> bool:
    if jax_module is None:
        return False
    from jax._src import xla_bridge

    return bool(xla_bridge._backends)


def compute_dtype(dtype) -> jnp.dtype:
    """The dtype a network whose ``dtype`` field is ``dtype`` computes in on the current backend.

    XLA:CPU has no fast 16-bit convolution or matmul on x86 (it converts around float32 kernels), so there a
    bfloat16/float16 network keeps its params in 16 bits (half the memory) and computes in float32, which is
    faster than its own 16-bit program (benchmarks/bench_unet.py). GPUs and TPUs compute in ``dtype``.
    """
    dtype = jnp.dtype(dtype)
    if dtype in (jnp.bfloat16, jnp.float16) and jax.default_backend() == "cpu":
        return jnp.dtype(jnp.float32)
    return dtype
