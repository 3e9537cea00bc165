"""JAX's persistent compilation cache, on for sdjax's command-line entry points, one call for library users.

A second ``sample.py`` run with the same model, image size, sampler and step count reads the compiled sampling
program from disk instead of compiling it again. The cache is keyed by JAX on the program, the backend and the
compiler flags, so a changed shape or sampler misses it and compiles (correct by construction); an entry
that cannot be read is skipped with a warning and recompiled.

Reading a compiled program still needs the program, and tracing the sampling loop in Python costs about a
second even for a tiny model, as does tracing a network's init for its parameter shapes. So the same folder
also keeps two trace caches, keyed by everything they depend on (module configs and dtypes, the sampler plan,
argument shapes, the JAX / Flax versions and a hash of sdjax's own source files): the sampling program as a
serialized ``jax.export`` module (``exported/``) and each network's parameter shapes (``param_shapes/``).
Any read error means a miss: the entry is rebuilt.

    import sdjax
    sdjax.enable_compile_cache()          # before the first compile; per-user folder, see cache_dir()

Environment: ``SDJAX_CACHE_DIR`` moves the folder; ``SDJAX_NO_COMPILE_CACHE=1`` turns it off (the CLIs also
take ``--no-compile-cache``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

ENV_DIR = "SDJAX_CACHE_DIR"
ENV_OFF = "SDJAX_NO_COMPILE_CACHE"


def cache_dir() -> Path:
    """``$SDJAX_CACHE_DIR``, else JAX's own cache folder when one is set (``JAX_COMPILATION_CACHE_DIR``), else
    ``$XDG_CACHE_HOME/sdjax/jax``, else ``~/.cache/sdjax/jax``."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]).expanduser()
    import jax

    if jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sdjax" / "jax"


def enable_compile_cache(path: str | os.PathLike | None = None) -> Path | None:
    """Turns on JAX's persistent compilation cache in ``path`` (default :func:`cache_dir`) for every program.

    Returns the folder, or None when ``SDJAX_NO_COMPILE_CACHE`` is set or the folder cannot be created (then
    nothing changes: compiling still works, only slower)."""
    if os.environ.get(ENV_OFF, "").strip().lower() in ("1", "true", "yes"):
        return None
    folder = Path(path).expanduser() if path is not None else cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    import jax

    jax.config.update("jax_compilation_cache_dir", os.fspath(folder))
    # Every program, small ones too: the text encoder's few-second compile is a fixed cost of each CLI run.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    global _TRACE_DIR
    _TRACE_DIR = folder
    return folder


_TRACE_DIR: Path | None = None  # set by enable_compile_cache: where the trace caches live


@functools.cache
def source_fingerprint() -> str:
    """sha256 of sdjax's .py sources and the JAX, jaxlib and Flax versions: a code change invalidates traces."""
    import flax
    import jax
    import jaxlib

    digest = hashlib.sha256(f"{jax.__version__} {jaxlib.__version__} {flax.__version__}".encode())
    for file in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(file.read_bytes())
    return digest.hexdigest()


def _entry(kind: str, key: str) -> Path | None:
    if _TRACE_DIR is None:
        return None
    return _TRACE_DIR / kind / hashlib.sha256(f"{source_fingerprint()} {key}".encode()).hexdigest()


def _write_atomically(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as f:
            f.write(data)
        os.replace(f.name, path)
    except OSError:
        pass  # a read-only or full cache folder only costs the next run a trace


# Parameter shapes traced in this process, by key: a second load of the same network skips its trace.
_PARAM_SHAPES: dict[str, Any] = {}


def cached_param_shapes(key: str, build: Callable[[], Any]) -> Any:
    """``build()`` (a tree of ``jax.ShapeDtypeStruct``, e.g. from ``jax.eval_shape``), from this process's memo,
    else read from the trace cache when an entry for ``key`` exists (with :func:`enable_compile_cache`)."""
    if key not in _PARAM_SHAPES:
        _PARAM_SHAPES[key] = _cached_param_shapes(key, build)
    return _PARAM_SHAPES[key]


def _cached_param_shapes(key: str, build: Callable[[], Any]) -> Any:
    import jax
    import numpy as np

    entry = _entry("param_shapes", key)
    if entry is not None and entry.is_file():
        try:
            flat = json.loads(entry.read_text())
            return _unflatten({k: jax.ShapeDtypeStruct(tuple(s), np.dtype(d)) for k, (s, d) in flat.items()})
        except (OSError, ValueError, TypeError):
            pass
    tree = build()
    if entry is not None:
        flat = {"/".join(k): (list(v.shape), str(v.dtype)) for k, v in _flatten(tree).items()}
        _write_atomically(entry, json.dumps(flat).encode())
    return tree


def _flatten(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {k: v for name, sub in tree.items() for k, v in _flatten(sub, (*prefix, name)).items()}


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, leaf in flat.items():
        *parents, name = path.split("/")
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        node[name] = leaf
    return tree


def compile_traced(key: str, jitted: Any, args: tuple) -> Any:
    """``jitted.lower(*args).compile()``, skipping the Python trace when the trace cache holds the program for
    ``key`` (which must name everything static about ``jitted``; the argument shapes are added here): the
    serialized ``jax.export`` module is read, and its compilation is served by the persistent cache."""
    import jax

    shapes = repr([(tuple(a.shape), str(a.dtype)) for a in jax.tree.leaves(args)])
    entry = _entry("exported", f"{key} {shapes}")
    if entry is not None and entry.is_file():
        try:
            exported = jax.export.deserialize(bytearray(entry.read_bytes()))
            return jax.jit(exported.call).lower(*args).compile()
        except Exception:  # noqa: BLE001 - any unreadable entry is a miss, never an error
            pass
    if entry is None:
        return jitted.lower(*args).compile()
    try:
        exported = jax.export.export(jitted)(*args)
        compiled = jax.jit(exported.call).lower(*args).compile()
    except Exception:  # noqa: BLE001 - e.g. a custom call export does not allow: compile without the trace cache
        return jitted.lower(*args).compile()
    try:
        _write_atomically(entry, bytes(exported.serialize()))
    except ImportError:  # jax.export's serialization needs flatbuffers: without it, only the trace is not kept
        pass
    return compiled
