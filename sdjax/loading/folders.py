"""diffusers Stable Diffusion folders: reading one (model_index.json + component folders) and writing one.

The writer is shared by ``StableDiffusion.save_pretrained`` and training workdirs (``DIR/model/``, where the
trained components have only a config.json: their weights live in the checkpoints).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from sdjax import tokenizer as tokenizer_lib
from sdjax import weights
from sdjax.errors import PipelineError

PIPELINE_CLASSES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")
# The networks of an SD folder and the diffusers / transformers class each must be.
NETWORKS = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel"}
TOKENIZER_ENTRY = ["transformers", "CLIPTokenizer"]

Params = dict[str, Any]


def read_model_index(path: Path) -> dict[str, Any]:
    """``path/model_index.json`` of a Stable Diffusion folder; PipelineError naming what is missing or unsupported."""
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise PipelineError(
            f"{path} has no model_index.json; expected a diffusers Stable Diffusion folder or an sdjax workdir"
        )
    index = weights.read_json(index_file)
    if index.get("_class_name") not in PIPELINE_CLASSES:
        raise PipelineError(
            f"{index_file} describes a {index.get('_class_name')!r}; supported: {', '.join(PIPELINE_CLASSES)}"
        )
    for name, class_name in NETWORKS.items():
        got = (index.get(name) or [None, None])[1]
        if got != class_name:
            raise PipelineError(f"{index_file}: component {name!r} is {got!r}; sdjax supports {class_name!r} there")
    return index


def read_scheduler_config(path: Path) -> dict[str, Any]:
    """``path/scheduler/scheduler_config.json`` as a dict; PipelineError when missing or not JSON."""
    file = path / "scheduler" / "scheduler_config.json"
    if not file.is_file():
        raise PipelineError(f"{path} has no scheduler/scheduler_config.json")
    return weights.read_json(file)


def load_networks(
    path: Path, dtype: Any, variant: str | None = None, trained: Params | None = None
) -> tuple[dict[str, Any], Params]:
    """(modules, params) of the folder's networks in ``dtype``; a network in ``trained`` (name -> host params,
    e.g. a workdir's checkpoint) takes those params instead of the folder's weights."""
    trained = trained or {}
    modules, params = {}, {}
    for name in NETWORKS:
        if name in trained:
            modules[name] = weights.build_component(path / name, dtype)
            params[name] = weights.to_device(trained[name], dtype)
        else:
            modules[name], params[name] = weights.load_component(path / name, dtype, variant)
    return modules, params


def write_model_folder(
    folder: str | Path,
    components: dict[str, tuple[Any, Params | None]],
    *,
    tokenizer: Any = None,
    scheduler_config: dict[str, Any] | None = None,
    dtype: Any = np.float32,
) -> None:
    """Writes a diffusers folder that diffusers' ``StableDiffusionPipeline.from_pretrained`` (or, VAE only,
    ``AutoencoderKL.from_pretrained``) loads.

    components: name ("unet", "vae", "text_encoder") -> (flax module, params or None). With params a component
    gets config.json + safetensors (stored as ``dtype``); without (a training run's trained components), only
    config.json, and model_index.json lists it under ``_sdjax_trained``. scheduler_config: the diffusers
    ``scheduler_config.json`` dict (with ``_class_name``).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, (module, params) in components.items():
        if params is None:
            _write_json(folder / name / "config.json", weights.component_config(module))
        else:
            weights.save_component(module, params, folder / name, dtype=dtype)
    index: dict[str, Any] = {"_class_name": "AutoencoderKL", "_diffusers_version": weights.DIFFUSERS_VERSION}
    if "unet" in components:
        index["_class_name"] = "StableDiffusionPipeline"
        index["safety_checker"] = index["feature_extractor"] = [None, None]
        index["requires_safety_checker"] = False
    for name, (module, _) in components.items():
        class_name = module.config_class.class_name
        index[name] = [weights.component_class(class_name)[1], class_name]
    if tokenizer is not None:
        tokenizer_lib.save_tokenizer(tokenizer, folder / "tokenizer")
        index["tokenizer"] = TOKENIZER_ENTRY
    if scheduler_config is not None:
        _write_json(folder / "scheduler" / "scheduler_config.json", scheduler_config)
        index["scheduler"] = ["diffusers", scheduler_config["_class_name"]]
    trained = sorted(name for name, (_, params) in components.items() if params is None)
    if trained:
        index["_sdjax_trained"] = trained
    _write_json(folder / "model_index.json", index)


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")
