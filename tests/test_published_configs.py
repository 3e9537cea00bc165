"""The published config.json files (tests/fixtures/published) build in sdjax, legacy fields and all, with
exactly the parameter count of the PyTorch classes (counted on torch's meta device: nothing allocated)."""

from __future__ import annotations

import math

import jax
import pytest
import torch

from sdjax import weights
from tests.published import FIXTURES

CASES = [
    pytest.param(model.name, component, id=f"{model.name}-{component}")
    for model in sorted(FIXTURES.iterdir())
    if model.is_dir()
    for component in ("unet", "vae", "text_encoder", "text_encoder_2")
    if (model / component).is_dir()  # the SDXL refiner has text_encoder_2 only
]


def _torch_count(folder) -> int:
    import diffusers
    import transformers

    class_name, config = weights.read_component_config(folder)
    with torch.device("meta"):
        if class_name in ("CLIPTextModel", "CLIPTextModelWithProjection"):
            model = getattr(transformers, class_name)(transformers.CLIPTextConfig.from_dict(config))
        else:
            model = getattr(diffusers, class_name).from_config(config)
    # transformers registers position_ids as a buffer, not a parameter: parameters are what both count.
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, component", CASES)
def test_published_config_builds_with_the_reference_parameter_count(name, component):
    folder = FIXTURES / name / component
    module = weights.build_component(folder)
    ours = sum(math.prod(x.shape) for x in jax.tree.leaves(weights.param_shapes(module)))
    assert ours == _torch_count(folder)


@pytest.mark.parametrize("name", ["controlnet_sd15_canny", "controlnet_sdxl_canny"])
def test_published_controlnet_config_builds_with_the_reference_parameter_count(name):
    folder = FIXTURES / name
    module = weights.build_component(folder)
    ours = sum(math.prod(x.shape) for x in jax.tree.leaves(weights.param_shapes(module)))
    assert ours == _torch_count(folder)


def test_inpainting_unet_takes_nine_input_channels():
    module = weights.build_component(FIXTURES / "sd15_inpainting" / "unet")
    assert module.config.in_channels == 9


@pytest.mark.parametrize("name", ["sd15", "sd21", "sd21_base"])
def test_single_file_scheduler_configs_are_the_published_files(name):
    """sdjax.single_file carries these three published scheduler configs; they must not drift from the files."""
    import json

    from sdjax.loading.single_file import SCHEDULER_CONFIGS

    published = json.loads((FIXTURES / name / "scheduler" / "scheduler_config.json").read_text())
    assert SCHEDULER_CONFIGS[name] == published


def test_shrunk_sdxl_refiner_folder_keeps_the_published_layout(tmp_path):
    """published_folder writes what model_index.json names (no text_encoder for the refiner), shrunk consistently:
    the UNet's context and pooled inputs fit the shrunk text_encoder_2, and sdjax loads every network."""
    from tests.published import published_folder

    folder = published_folder("sdxl_refiner", tmp_path / "model")
    assert sorted(p.name for p in folder.iterdir()) == [
        "model_index.json", "scheduler", "text_encoder_2", "tokenizer_2", "unet", "vae"
    ]  # fmt: skip
    unet, _ = weights.load_component(folder / "unet")
    text_encoder, _ = weights.load_component(folder / "text_encoder_2")
    weights.load_component(folder / "vae")
    assert unet.config.cross_attention_dim == text_encoder.config.hidden_size
    time_ids_width = 5 * unet.config.addition_time_embed_dim  # original size, crop, aesthetic score
    assert unet.config.projection_class_embeddings_input_dim == text_encoder.config.projection_dim + time_ids_width
