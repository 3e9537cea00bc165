"""JAX's persistent compilation cache, on for sdjax's command-line entry points, one call for library users.

A second ``sample.py`` run with the same model, image size, sampler and step count reads the compiled sampling
program from disk instead of compiling it again. The cache is keyed by JAX on the program, the backend and the
compiler flags, so a changed shape or sampler misses it and compiles (correct by construction); an entry
that cannot be read is skipped with a warning and recompiled.

    import sdjax
    sdjax.enable_compile_cache()          # before the first compile; per-user folder, see cache_dir()

Environment: ``SDJAX_CACHE_DIR`` moves the folder; ``SDJAX_NO_COMPILE_CACHE=1`` turns it off (the CLIs also
take ``--no-compile-cache``).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_DIR = "SDJAX_CACHE_DIR"
ENV_OFF = "SDJAX_NO_COMPILE_CACHE"


def cache_dir() -> Path:
    """``$SDJAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/sdjax/jax``, else ``~/.cache/sdjax/jax``."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]).expanduser()
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
    return folder
