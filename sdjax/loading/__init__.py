"""From what users have on disk to modules + params: diffusers folders, sdjax training workdirs, single files.

:func:`load` is the one entry point (``StableDiffusion.from_pretrained`` calls it); :mod:`.folders` reads and
writes diffusers folders, :mod:`.single_file` reads original LDM ``.safetensors`` checkpoints (names converted by
:mod:`.ldm_names`). Add-ons that modify loaded params (LoRA, textual inversion) belong in this package too.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from sdjax import schedule, tokenizer
from sdjax.errors import PipelineError
from sdjax.loading import folders


@dataclasses.dataclass
class Components:
    """A loaded Stable Diffusion: modules and params per network ("unet", "vae", "text_encoder"), the tokenizer,
    the scheduler config and its diffusers class name."""

    modules: dict[str, Any]
    params: dict[str, Any]
    tokenizer: Any
    schedule: schedule.ScheduleConfig
    scheduler_class: str


def load(
    path: str | os.PathLike,
    dtype: Any = jnp.float32,
    variant: str | None = None,
    *,
    tokenizer_path: str | os.PathLike | None = None,
    prediction_type: str | None = None,
) -> Components:
    """Loads a diffusers folder, an sdjax workdir (its latest checkpoint's EMA params over ``DIR/model/``) or a
    single-file LDM ``.safetensors`` checkpoint. See ``StableDiffusion.from_pretrained`` for the arguments."""
    check_dtype(dtype)
    path = Path(path)
    if not path.exists():
        raise PipelineError(
            f"model path {path} does not exist; expected a diffusers folder, sdjax workdir or .safetensors file"
        )
    if path.is_file():
        return _from_single_file(path, dtype, tokenizer_path, prediction_type)
    from sdjax import checkpoint  # imports orbax: only needed for workdirs

    if checkpoint.is_workdir(path):
        return _from_folder(path / checkpoint.MODEL_DIR, dtype, variant, checkpoint.load_trained_params(path))
    return _from_folder(path, dtype, variant)


DTYPES = ("float32", "bfloat16", "float16")


def check_dtype(dtype: Any) -> None:
    """PipelineError unless ``dtype`` names one of :data:`DTYPES` (a jnp dtype, numpy dtype or string)."""
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name not in DTYPES:
        raise PipelineError(f"dtype {dtype!r} is not supported; accepted: {', '.join(DTYPES)}")


def _from_single_file(path: Path, dtype: Any, tokenizer_path: Any, prediction_type: str | None) -> Components:
    from sdjax.loading import single_file

    if path.suffix != ".safetensors":
        raise PipelineError(f"{path}: single-file checkpoints are read as .safetensors only (got {path.suffix!r})")
    modules, params, scheduler_config = single_file.load_single_file(path, dtype, prediction_type)
    if tokenizer_path is None:
        tok = single_file.default_tokenizer(modules["text_encoder"].config)
    else:
        tok = tokenizer.load_tokenizer(tokenizer_path)
    return Components(
        modules,
        params,
        tok,
        schedule.ScheduleConfig.from_dict(scheduler_config),
        scheduler_config.get("_class_name", "PNDMScheduler"),
    )


def _from_folder(path: Path, dtype: Any, variant: str | None, trained: dict | None = None) -> Components:
    index = folders.read_model_index(path)
    modules, params = folders.load_networks(path, dtype, variant, trained)
    try:
        schedule_cfg = schedule.ScheduleConfig.from_dict(folders.read_scheduler_config(path))
    except (TypeError, ValueError) as e:
        if isinstance(e, PipelineError):
            raise
        raise PipelineError(f"{path / 'scheduler' / 'scheduler_config.json'}: {e}") from e
    scheduler_class = index.get("scheduler", [None, "DDIMScheduler"])[1]
    return Components(modules, params, tokenizer.load_tokenizer(path / "tokenizer"), schedule_cfg, scheduler_class)
