"""Per-platform choices: the XLA:CPU flags entry points set before JAX starts, and giving freed heap back.

Importing sdjax changes no global state: only entry points (today the benchmarks) call :func:`configure_cpu`,
first thing. No flag has yet been measured to help the whole UNet (benchmarks/bench_unet.py --sweep-flags), so
:data:`CPU_XLA_FLAGS` is empty and the call changes nothing until one is.
"""

from __future__ import annotations

import os
from typing import Any

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


def release_free_memory() -> bool:
    """Hands the C heap's free pages back to the OS (glibc ``malloc_trim``); returns whether it could.

    XLA frees what a compilation used (0.3-0.4 GiB for the SD 1.5 sampling program) but glibc keeps those pages
    in its arenas, where the program's buffers, allocated afresh at run time, do not reuse them: the pages count
    toward the process's memory for as long as it runs. The pipeline calls this after each compile (a few ms).
    A no-op returning False off glibc (macOS, musl, Windows)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True


def compute_module(module: Any) -> Any:
    """The network that samples: ``module`` itself, or on the CPU a float32 copy of a 16-bit one. XLA:CPU has no
    fast 16-bit convolution (bench_unet: 6.06 s per SD 1.5 UNet evaluation in bfloat16 against 5.07 s in float32),
    so a bfloat16 pipeline keeps its params in 16 bits and the sampling program casts them to float32 once, before
    its loop (``DenoiseSpec.upcast_params``). GPUs and TPUs compute in the module's dtype."""
    import jax
    import jax.numpy as jnp

    if jax.default_backend() == "cpu" and jnp.dtype(module.dtype) != jnp.float32:
        return module.clone(dtype=jnp.float32)
    return module
