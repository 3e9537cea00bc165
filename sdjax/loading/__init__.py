"""From what users have on disk to modules + params: diffusers folders, sdjax training workdirs, single files.

:func:`load` is the one entry point (``StableDiffusion.from_pretrained`` calls it); :mod:`.folders` reads and
writes diffusers folders, :mod:`.single_file` reads original LDM ``.safetensors`` checkpoints (names converted by
:mod:`.ldm_names`), :mod:`.single_file_xl` Stability AI's SDXL ones (:mod:`.ldm_names_xl`). Add-ons that modify
loaded params (LoRA, textual inversion) belong in this package too.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from sdjax import _submodule, schedule, tokenizer, weights
from sdjax.errors import PipelineError
from sdjax.loading import folders, generation_config


@dataclasses.dataclass
class Components:
    """A loaded Stable Diffusion: modules and params per network ("unet", "vae", "text_encoder", SDXL's
    "text_encoder_2"), the tokenizer(s) by folder name, the scheduler config and its diffusers class name, the
    family ("sd" / "sdxl") and the model_index options the family reads."""

    modules: dict[str, Any]
    params: dict[str, Any]
    tokenizers: dict[str, Any]
    schedule: schedule.ScheduleConfig
    scheduler_class: str
    family: str = "sd"
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    generation: dict[str, Any] = dataclasses.field(default_factory=dict)  # generation_config.json's settings

    @property
    def tokenizer(self) -> Any:
        return self.tokenizers.get("tokenizer")


def load(
    path: str | os.PathLike,
    dtype: Any = jnp.float32,
    variant: str | None = None,
    *,
    tokenizer_path: str | os.PathLike | None = None,
    prediction_type: str | None = None,
    family: str | None = None,
    config: str | os.PathLike | None = None,
) -> Components:
    """Loads a diffusers folder, an sdjax workdir (its latest checkpoint's EMA params over ``DIR/model/``) or a
    single-file LDM ``.safetensors`` checkpoint (SD 1.x / 2.x or SDXL). See ``StableDiffusion.from_pretrained`` for
    the arguments; ``family`` ("sd" / "sdxl") refuses, in one line, a model of the other family; ``config``: a
    diffusers SDXL folder whose configs and tokenizers an SDXL single file is read with (see :mod:`.single_file_xl`)."""
    check_dtype(dtype)
    path = Path(path)
    if not path.exists():
        raise PipelineError(
            f"model path {path} does not exist; expected a diffusers folder, sdjax workdir or .safetensors file"
        )
    if path.is_file():
        return _from_file(path, dtype, family, tokenizer_path, prediction_type, config)
    _single_file_only(path, tokenizer_path, prediction_type, "a folder, which has its own tokenizer and scheduler")
    if config is not None:
        raise PipelineError(f"config={config} is read for single-file SDXL checkpoints only; {path} is a folder")
    from sdjax import checkpoint  # imports orbax: only needed for workdirs

    if checkpoint.is_workdir(path):
        model = path / checkpoint.MODEL_DIR
        folders.read_model_index(model, family)  # the family check before reading the checkpoint
        trained = checkpoint.load_trained_params(path)
        if "lora" in trained:  # a LoRA run (sdjax.train.lora_stage): its base model with the factors merged in
            from sdjax.loading import lora_export

            components = _from_folder(model, dtype, variant, family=family)
            components.params = lora_export.merged_params(components.params, path, trained["lora"])
            return components
        return _from_folder(model, dtype, variant, trained, family)
    return _from_folder(path, dtype, variant, family=family)


def family_of(path: str | os.PathLike) -> str:
    """ "sd" or "sdxl": the family of a diffusers folder or sdjax workdir (from model_index.json) or of a
    single-file checkpoint (from its keys, reading only the header)."""
    path = Path(path)
    if path.is_dir():
        from sdjax import checkpoint

        folder = path / checkpoint.MODEL_DIR if checkpoint.is_workdir(path) else path
        index = folders.read_model_index(folder)
        return folders.layout_of(index, folder).family
    if not path.is_file():
        return "sd"  # load() then says that the path does not exist
    from sdjax.loading import single_file_xl

    return single_file_xl.file_family(path)


DTYPES = ("float32", "bfloat16", "float16")


def check_dtype(dtype: Any) -> None:
    """PipelineError unless ``dtype`` names one of :data:`DTYPES` (a jnp dtype, numpy dtype or string)."""
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name not in DTYPES:
        raise PipelineError(f"dtype {dtype!r} is not supported; accepted: {', '.join(DTYPES)}")


def _from_file(
    path: Path, dtype: Any, family: str | None, tokenizer_path: Any, prediction_type: str | None, config: Any
) -> Components:
    from sdjax.loading import single_file_xl

    found = single_file_xl.file_family(path)
    if family is not None and found != family:
        layout = next(lay for lay in folders.LAYOUTS if lay.family == found)
        raise PipelineError(
            f"{path} is an {found} single-file checkpoint, not {family}: load it with "
            f"sdjax.{layout.pipeline}.from_pretrained or sdjax.from_pretrained"
        )
    if found == "sdxl":
        _single_file_only(path, tokenizer_path, prediction_type, "an SDXL file (config= gives it a folder's)")
        return single_file_xl.load(path, dtype, config)
    if config is not None:
        raise PipelineError(f"config= is read for SDXL single files; {path} is SD 1.x/2.x (it takes tokenizer_path)")
    return _from_single_file(path, dtype, tokenizer_path, prediction_type)


def _single_file_only(path: Path, tokenizer_path: Any, prediction_type: str | None, what: str) -> None:
    """PipelineError for the SD 1.x / 2.x single-file options on a model they would not act on."""
    for name, value in (("tokenizer_path", tokenizer_path), ("prediction_type", prediction_type)):
        if value is not None:
            raise PipelineError(f"{name} applies to SD 1.x / 2.x single-file checkpoints; {path} is {what}")


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
        {"tokenizer": tok},
        schedule.ScheduleConfig.from_dict(scheduler_config),
        scheduler_config.get("_class_name", "PNDMScheduler"),
    )


def _from_folder(
    path: Path, dtype: Any, variant: str | None, trained: dict | None = None, family: str | None = None
) -> Components:
    index = folders.read_model_index(path, family)
    layout = folders.layout_of(index, path)
    names = folders.present_networks(index, layout)
    modules, params = folders.load_networks(path, dtype, variant, trained, names, network_dtypes(path, layout, dtype))
    try:
        schedule_cfg = schedule.ScheduleConfig.from_dict(folders.read_scheduler_config(path))
    except (TypeError, ValueError) as e:
        if isinstance(e, PipelineError):
            raise
        raise PipelineError(f"{path / 'scheduler' / 'scheduler_config.json'}: {e}") from e
    scheduler_class = index.get("scheduler", [None, "DDIMScheduler"])[1]
    tokenizers = {
        name: tokenizer.load_tokenizer(path / name)
        for name in layout.tokenizers
        if (index.get(name) or [None, None])[1] is not None or layout.family == "sd"
    }
    options = {key: index.get(key, default) for key, default in layout.options.items()}
    generation = generation_config.read(path)
    return Components(modules, params, tokenizers, schedule_cfg, scheduler_class, layout.family, options, generation)


def network_dtypes(path: Path, layout: folders.Layout, dtype: Any) -> dict[str, Any]:
    """SDXL's VAE overflows in 16 bits: with ``force_upcast`` in its config it computes in float32 (as diffusers'
    SDXL pipelines decode), whatever the pipeline's dtype."""
    if layout.family != "sdxl" or jnp.dtype(dtype) == jnp.float32:
        return {}
    _, vae_config = weights.read_component_config(path / "vae")
    return {"vae": jnp.float32} if vae_config.get("force_upcast", True) else {}


def __getattr__(name: str) -> Any:
    # Submodules on first use, after a bare `import sdjax` too.
    return _submodule(__name__, __path__, name)
