"""sdjax.ControlNet.from_pretrained on the published ControlNet layouts (config files as published, shrunk widths,
random perturbed weights saved by diffusers): from the folder, and from single files with diffusers' and with the
original (control_model.*) names; its compatibility checks; bad input in one line."""

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel as TorchControlNet
from safetensors.numpy import load_file, save_file

import sdjax
from sdjax.errors import PipelineError
from sdjax.loading import controlnet as controlnet_loading
from sdjax.models.controlnet import ControlNetConfig, ControlNetModel
from sdjax.models.unet import UNet2DConditionConfig
from sdjax.weights import WeightsError
from tests.published import published_controlnet_folder, shrunk_controlnet_config, shrunk_unet_config
from tests.test_controlnet import TOLERANCE, controlnet_inputs, residual_errors, torch_residuals

jax.config.update("jax_default_matmul_precision", "highest")

LAYOUTS = ["controlnet_sd15_canny", "controlnet_sdxl_canny"]
POOLED = 64  # the shrunk pooled text width (tests.published.TEXT_WIDTH)


@pytest.fixture(scope="module", params=LAYOUTS)
def layout(request, tmp_path_factory):
    folder = published_controlnet_folder(request.param, tmp_path_factory.mktemp(request.param) / "controlnet")
    return request.param, folder, sdjax.ControlNet.from_pretrained(folder)


def _inputs(controlnet) -> dict:
    """16x16 latents (128-pixel control images) with the ControlNet's config; SDXL's time ids and pooled text."""
    config = dataclasses.asdict(controlnet.config)
    config["cross_attention_dim"] = controlnet.cross_attention_dim
    inputs = controlnet_inputs(config, size=16)
    if controlnet.family == "sdxl":
        inputs["text_embeds"] = np.random.default_rng(2).standard_normal((2, POOLED), dtype=np.float32)
    return inputs


def _state(folder) -> dict[str, np.ndarray]:
    return load_file(folder / "diffusion_pytorch_model.safetensors")


def _same_params(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def test_published_layout_residuals_match_diffusers(layout):
    name, folder, controlnet = layout
    reference_model = TorchControlNet.from_pretrained(folder).eval()  # from disk, as sdjax read it
    inputs = _inputs(controlnet)
    reference = torch_residuals(reference_model, inputs, scale=0.7)
    added = {k: inputs[k] for k in ("text_embeds", "time_ids") if k in inputs}
    down, mid = controlnet(inputs["sample"], inputs["timesteps"], inputs["context"], inputs["cond"], 0.7, **added)
    error = residual_errors(([np.asarray(r) for r in down], np.asarray(mid)), reference)
    print(f"{name} published layout: residuals max rel error {error:.2e}")
    assert error <= TOLERANCE


def test_published_layout_describes_its_family(layout):
    name, _, controlnet = layout
    sdxl = name == "controlnet_sdxl_canny"
    assert controlnet.family == ("sdxl" if sdxl else "sd")
    assert controlnet.cross_attention_dim == (128 if sdxl else 64)  # shrunk: 64 per text encoder
    assert controlnet.conditioning_channels == 3
    assert controlnet.config.conditioning_downsampling == 8


def test_single_file_with_diffusers_names_loads_the_same_weights_and_config(layout, tmp_path):
    name, folder, controlnet = layout
    file = tmp_path / f"{name}.safetensors"
    shutil.copy(folder / "diffusion_pytorch_model.safetensors", file)
    single = sdjax.ControlNet.from_pretrained(file)
    assert _same_params(single.params, controlnet.params)
    # The config read from the shapes is the published one (upcast_attention null and false read alike).
    published = controlnet.config
    assert dataclasses.replace(single.config, upcast_attention=published.upcast_attention) == published


@pytest.mark.parametrize("prefix", ["control_model.", ""], ids=["control_model", "bare"])
def test_single_file_with_original_names_loads_the_same_weights(layout, tmp_path, prefix):
    name, folder, controlnet = layout
    file = tmp_path / f"{name}_ldm.safetensors"
    ldm = controlnet_loading.diffusers_to_ldm(_state(folder))
    assert "input_hint_block.14.weight" in ldm and "middle_block_out.0.weight" in ldm
    extra = {"model.diffusion_model.out.2.bias": np.zeros(4, np.float32)} if prefix else {}  # ignored
    save_file({**{prefix + k: v for k, v in ldm.items()}, **extra}, str(file))
    assert _same_params(sdjax.ControlNet.from_pretrained(file).params, controlnet.params)


def test_diffusers_single_file_loader_reads_our_original_names(tmp_path):
    """The original names sdjax reads and writes are those diffusers' own converter maps (SD 1.5 canny layout)."""
    folder = published_controlnet_folder("controlnet_sd15_canny", tmp_path / "controlnet")
    file = tmp_path / "control_v11p_sd15_canny.safetensors"
    ldm = controlnet_loading.diffusers_to_ldm(_state(folder))
    save_file({f"control_model.{k}": v for k, v in ldm.items()}, str(file))
    converted = TorchControlNet.from_single_file(str(file), config=str(folder), local_files_only=True)
    original = _state(folder)
    assert set(converted.state_dict()) == set(original)
    for key, value in converted.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), original[key], err_msg=key)


def test_config_argument_replaces_the_inferred_config(layout, tmp_path):
    name, folder, controlnet = layout
    if name != "controlnet_sd15_canny":
        pytest.skip("one layout covers it")
    file = tmp_path / "shuffle.safetensors"
    shutil.copy(folder / "diffusion_pytorch_model.safetensors", file)
    config = {**json.loads((folder / "config.json").read_text()), "global_pool_conditions": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert sdjax.ControlNet.from_pretrained(file, config=tmp_path).config.global_pool_conditions
    assert not sdjax.ControlNet.from_pretrained(file).config.global_pool_conditions


# --- compatibility with a pipeline's UNet


def _controlnet(name: str) -> sdjax.ControlNet:
    """A ControlNet of the shrunk published layout ``name`` (params are not needed for the checks)."""
    return sdjax.ControlNet(ControlNetModel(ControlNetConfig.from_dict(shrunk_controlnet_config(name))), {}, name)


def _unet(name: str, **changes) -> UNet2DConditionConfig:
    return UNet2DConditionConfig.from_dict({**shrunk_unet_config(name), **changes})


@pytest.mark.parametrize(
    "unet, controlnet, latent_channels, message",
    [
        (_unet("sdxl_base"), "controlnet_sd15_canny", 4, "is an SD 1.x/2.x ControlNet and the pipeline is SDXL"),
        (_unet("sd15"), "controlnet_sdxl_canny", 4, "is an SDXL ControlNet and the pipeline is SD 1.x/2.x"),
        (_unet("sd15", cross_attention_dim=128), "controlnet_sd15_canny", 4, "attends to 64-wide text and the "
         "pipeline's UNet to 128-wide"),
        (_unet("sdxl_refiner"), "controlnet_sdxl_canny", 4, "attends to 128-wide text and the pipeline's UNet to 64"),
        (_unet("sdxl_base", projection_class_embeddings_input_dim=64 + 5 * 256), "controlnet_sdxl_canny", 4,
         "takes 1600 added-embedding inputs and the UNet 1344"),
        (_unet("sd21"), "controlnet_sd15_canny", 4, r"gives residuals of \[32, 32, 32, 32.*have \[64, 64"),
        (_unet("sd15"), "controlnet_sd15_canny", 16, "reads 4-channel latents and the pipeline's VAE makes 16"),
    ],
    ids=["sd_controlnet_sdxl_pipe", "sdxl_controlnet_sd_pipe", "text_width", "refiner_width", "time_ids",
         "sd21_blocks", "latents"],
)  # fmt: skip
def test_incompatible_pipelines_are_refused_in_one_line(unet, controlnet, latent_channels, message):
    with pytest.raises(PipelineError, match=message):
        _controlnet(controlnet).check_compatible(unet, latent_channels)


@pytest.mark.parametrize(
    "unet, controlnet",
    [
        (_unet("sd15"), "controlnet_sd15_canny"),
        (_unet("sd15", in_channels=9), "controlnet_sd15_canny"),  # an inpainting UNet: the ControlNet reads 4
        (_unet("sdxl_base"), "controlnet_sdxl_canny"),
    ],
    ids=["sd15", "sd15_inpainting", "sdxl"],
)
def test_a_fitting_pipeline_passes_the_checks(unet, controlnet):
    _controlnet(controlnet).check_compatible(unet, 4)


# --- bad input


def _written(path, data: bytes):
    path.write_bytes(data)
    return path


def _unet_folder(tmp_path):
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    return folder


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing", "ControlNet path .*missing does not exist; expected a diffusers ControlNetModel"),
        (_unet_folder, r"describes a 'UNet2DConditionModel', not a ControlNet"),
        (lambda p: _written(p / "x.ckpt", b"\x80"), "read as .safetensors only"),
        (
            lambda p: save_file({"model.diffusion_model.x": np.zeros(1, np.float32)}, str(p / "sd.safetensors"))
            or p / "sd.safetensors",
            r"is not a ControlNet \(a Stable Diffusion checkpoint\)",
        ),
        (
            lambda p: (p / "model_index.json").write_text('{"_class_name": "StableDiffusionControlNetPipeline", '
                                                          '"controlnet": ["diffusers", "ControlNetModel"]}') and p,
            r"pipeline folder, not a ControlNet; its ControlNet is .*controlnet",
        ),
    ],
    ids=["missing", "unet_folder", "pickle", "sd_checkpoint", "pipeline_folder"],
)  # fmt: skip
def test_what_is_not_a_controlnet_is_refused_in_one_line(tmp_path, make, message):
    with pytest.raises(PipelineError, match=message) as error:
        sdjax.ControlNet.from_pretrained(make(tmp_path))
    assert "\n" not in str(error.value)


def test_missing_and_mismatched_weights_are_listed_in_one_line(layout, tmp_path):
    name, folder, _ = layout
    if name != "controlnet_sd15_canny":
        pytest.skip("one layout covers it")
    state = _state(folder)
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(folder / "config.json", broken)
    del state["controlnet_mid_block.bias"]
    state["controlnet_down_blocks.0.weight"] = state["controlnet_down_blocks.0.weight"][:8]
    save_file(state, str(broken / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(WeightsError, match=r"1 missing \(controlnet_mid_block.bias\); 1 shape-mismatched") as error:
        sdjax.ControlNet.from_pretrained(broken)
    assert "\n" not in str(error.value)
    save_file(state, str(tmp_path / "broken.safetensors"))
    with pytest.raises(WeightsError, match="no weight for 'controlnet_mid_block|missing"):
        sdjax.ControlNet.from_pretrained(tmp_path / "broken.safetensors")


def test_unsupported_dtype_is_refused_before_loading(tmp_path):
    with pytest.raises(PipelineError, match="dtype"):
        sdjax.ControlNet.from_pretrained(tmp_path, dtype="int8")


def test_torch_loads_what_the_fixture_wrote(layout):
    """The shrunk published folder is a valid diffusers ControlNet (guards the fixture itself)."""
    _, folder, controlnet = layout
    model = TorchControlNet.from_pretrained(folder)
    assert sum(p.numel() for p in model.parameters()) == sum(x.size for x in jax.tree.leaves(controlnet.params))
    assert torch.is_tensor(next(model.parameters()))
