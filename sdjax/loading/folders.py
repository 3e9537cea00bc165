"""diffusers Stable Diffusion folders: reading one (model_index.json + component folders) and writing one.

A :class:`Layout` per model family says which pipeline classes, networks and tokenizers its folders hold (SD 1.x /
2.x; SDXL base and refiner). The writer is shared by ``save_pretrained`` and training workdirs (``DIR/model/``,
where the trained components have only a config.json: their weights live in the checkpoints).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from sdjax import tokenizer as tokenizer_lib
from sdjax import weights
from sdjax.errors import PipelineError

TOKENIZER_ENTRY = ["transformers", "CLIPTokenizer"]


@dataclasses.dataclass(frozen=True, eq=False)
class Layout:
    """What a model family's diffusers folders hold.

    family: "sd" or "sdxl"; pipeline_classes: model_index ``_class_name`` values (the first is written; the
    last is the inpainting pipeline's, written for a 9-channel inpainting UNet, see :func:`is_inpainting`);
    networks: component name -> diffusers / transformers class; optional: networks a folder may list as
    [null, null] (SDXL's refiner has no first text encoder); tokenizers: the tokenizer folders, one per text
    encoder, in order; pipeline: the sdjax class that loads it; options: model_index fields the family reads,
    with diffusers' defaults."""

    family: str
    pipeline_classes: tuple[str, ...]
    networks: dict[str, str]
    tokenizers: tuple[str, ...]
    pipeline: str
    optional: tuple[str, ...] = ()
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


SD = Layout(
    "sd",
    ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"),
    {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel"},
    ("tokenizer",),
    "StableDiffusion",
)
SDXL = Layout(
    "sdxl",
    ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"),
    {
        "unet": "UNet2DConditionModel",
        "vae": "AutoencoderKL",
        "text_encoder": "CLIPTextModel",
        "text_encoder_2": "CLIPTextModelWithProjection",
    },
    ("tokenizer", "tokenizer_2"),
    "StableDiffusionXL",
    optional=("text_encoder",),
    options={"force_zeros_for_empty_prompt": True, "requires_aesthetics_score": False},
)
LAYOUTS = (SD, SDXL)
PIPELINE_CLASSES = tuple(c for layout in LAYOUTS for c in layout.pipeline_classes)
NETWORKS = SD.networks  # kept for callers of earlier versions

Params = dict[str, Any]


def is_inpainting(unet_config: Any) -> bool:
    """Whether a UNet is an inpainting model: its input is the latents, the downsampled mask and the masked
    image's latents (SD / SDXL inpainting: in_channels 9 = 4 + 1 + 4)."""
    return unet_config.in_channels == 2 * unet_config.out_channels + 1


def layout_of(index: dict[str, Any], where: Path | str) -> Layout:
    """The family layout of a parsed model_index.json; PipelineError for other pipeline classes."""
    class_name = index.get("_class_name")
    for layout in LAYOUTS:
        if class_name in layout.pipeline_classes:
            return layout
    raise PipelineError(f"{where} describes a {class_name!r}; supported: {', '.join(PIPELINE_CLASSES)}")


def present_networks(index: dict[str, Any], layout: Layout) -> list[str]:
    """The networks a folder's model_index lists (an optional one may be [null, null])."""
    return [n for n in layout.networks if not (n in layout.optional and (index.get(n) or [None, None])[1] is None)]


def read_model_index(path: Path, family: str | None = None) -> dict[str, Any]:
    """``path/model_index.json`` of a Stable Diffusion folder; PipelineError naming what is missing or unsupported,
    or, with ``family``, when the folder holds another family (naming the class that loads it)."""
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise PipelineError(
            f"{path} has no model_index.json; expected a diffusers Stable Diffusion folder or an sdjax workdir"
        )
    index = weights.read_json(index_file)
    layout = layout_of(index, index_file)
    if family is not None and layout.family != family:
        wanted = next(lay for lay in LAYOUTS if lay.family == family)
        raise PipelineError(
            f"{path} is a {index['_class_name']} folder ({layout.family}), not {wanted.family}: load it with "
            f"sdjax.{layout.pipeline}.from_pretrained or sdjax.from_pretrained"
        )
    for name in present_networks(index, layout):
        got, class_name = (index.get(name) or [None, None])[1], layout.networks[name]
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
    path: Path,
    dtype: Any,
    variant: str | None = None,
    trained: Params | None = None,
    names: list[str] | None = None,
    dtypes: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], Params]:
    """(modules, params) of the folder's networks ``names`` (default: SD's three) in ``dtype`` (or ``dtypes[name]``);
    a network in ``trained`` (name -> host params, e.g. a workdir's checkpoint) takes those params instead of the
    folder's weights."""
    trained, dtypes = trained or {}, dtypes or {}
    modules, params = {}, {}
    for name in names or SD.networks:
        dtype_of = dtypes.get(name, dtype)
        if name in trained:
            modules[name] = weights.build_component(path / name, dtype_of)
            params[name] = weights.to_device(trained[name], dtype_of)
        else:
            modules[name], params[name] = weights.load_component(path / name, dtype_of, variant)
    return modules, params


def write_model_folder(
    folder: str | Path,
    components: dict[str, tuple[Any, Params | None]],
    *,
    tokenizer: Any = None,
    scheduler_config: dict[str, Any] | None = None,
    dtype: Any = np.float32,
    layout: Layout = SD,
    tokenizers: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
) -> None:
    """Writes a diffusers folder that diffusers' ``StableDiffusionPipeline.from_pretrained`` (or, VAE only,
    ``AutoencoderKL.from_pretrained``) loads.

    components: name ("unet", "vae", "text_encoder") -> (flax module, params or None). With params a component
    gets config.json + safetensors (stored as ``dtype``); without (a training run's trained components), only
    config.json, and model_index.json lists it under ``_sdjax_trained``. scheduler_config: the diffusers
    ``scheduler_config.json`` dict (with ``_class_name``). layout: the family (model_index ``_class_name``,
    the null entries of its absent optional networks); tokenizers: folder name -> tokenizer, for families with
    several (``tokenizer`` is ``{"tokenizer": tokenizer}``); options: model_index fields such as SDXL's
    ``force_zeros_for_empty_prompt``.
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
        inpainting = is_inpainting(components["unet"][0].config)
        index["_class_name"] = layout.pipeline_classes[-1 if inpainting else 0]
        if layout is SD:
            index["safety_checker"] = index["feature_extractor"] = [None, None]
            index["requires_safety_checker"] = False
        index.update(options or {})
    absent = [n for n in (*layout.optional, *layout.tokenizers[:-1]) if layout is not SD]
    index.update({name: [None, None] for name in absent})  # the refiner's missing first text encoder
    for name, (module, _) in components.items():
        class_name = module.config_class.class_name
        index[name] = [weights.component_class(class_name)[1], class_name]
    tokenizers = dict(tokenizers or {})
    if tokenizer is not None:
        tokenizers["tokenizer"] = tokenizer
    for name, tok in tokenizers.items():
        tokenizer_lib.save_tokenizer(tok, folder / name)
        index[name] = TOKENIZER_ENTRY
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
