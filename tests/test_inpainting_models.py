"""Inpainting models (UNet in_channels 9: latents + downsampled mask + masked-image latents) load from diffusers
folders (StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline) and single files, through
StableDiffusion / StableDiffusionXL.from_pretrained and sdjax.from_pretrained; the published SD 1.5 inpainting
layout's UNet matches diffusers'; until inpainting generation lands, generate refuses them in one line."""

import json
import shutil

import jax
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline
from diffusers import UNet2DConditionModel as TorchUNet
from safetensors.numpy import save_file
from safetensors.torch import load_file

import sdjax
from sdjax.errors import PipelineError
from sdjax.loading import ldm_names, ldm_names_xl, single_file_xl
from tests.published import published_folder
from tests.reference import perturb_, tiny_sdxl_pipeline

jax.config.update("jax_default_matmul_precision", "highest")

REFUSAL = r"^this is an inpainting model \(UNet in_channels 9\): pass init_image and mask_image$"


@pytest.fixture(scope="module")
def sd15_inpainting(tmp_path_factory):
    """The published runwayml/stable-diffusion-inpainting layout (configs as published, shrunk widths)."""
    folder = published_folder("sd15_inpainting", tmp_path_factory.mktemp("sd15_inpainting") / "model")
    return folder, sdjax.StableDiffusion.from_pretrained(folder)


@pytest.fixture(scope="module")
def sdxl_inpainting(tmp_path_factory):
    """A tiny SDXL base folder made an inpainting one as diffusers/stable-diffusion-xl-1.0-inpainting-0.1 is: a
    9-channel UNet and model_index.json's StableDiffusionXLInpaintPipeline."""
    folder = tmp_path_factory.mktemp("sdxl_inpainting") / "model"
    tiny_sdxl_pipeline(folder)
    config = {**json.loads((folder / "unet" / "config.json").read_text()), "in_channels": 9}
    shutil.rmtree(folder / "unet")
    torch.manual_seed(5)
    perturb_(TorchUNet.from_config(config), seed=5).save_pretrained(folder / "unet", safe_serialization=True)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLInpaintPipeline"}))
    return folder


def test_published_sd15_inpainting_folder_loads_with_nine_input_channels(sd15_inpainting):
    folder, pipe = sd15_inpainting
    assert pipe.unet.config.in_channels == 9 and pipe.unet.config.out_channels == 4
    assert isinstance(sdjax.from_pretrained(folder), sdjax.StableDiffusion)


def test_published_sd15_inpainting_unet_matches_diffusers(sd15_inpainting):
    folder, pipe = sd15_inpainting
    reference = TorchUNet.from_pretrained(folder / "unet").eval()
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 16, 16, 9), dtype=np.float32)  # latents, mask, masked-image latents
    context = rng.standard_normal((2, 77, pipe.unet.config.cross_attention_dim), dtype=np.float32)
    timesteps = np.array([981, 21])
    with torch.no_grad():
        expected = reference(torch.from_numpy(sample).permute(0, 3, 1, 2), torch.from_numpy(timesteps),
                             torch.from_numpy(context)).sample.permute(0, 2, 3, 1).numpy()  # fmt: skip
    ours = jax.jit(pipe.unet.apply)({"params": pipe.params["unet"]}, sample, timesteps, context)
    error = float(np.abs(np.asarray(ours) - expected).max() / np.abs(expected).max())
    print(f"sd15_inpainting published layout: UNet max rel error {error:.2e}")
    assert error <= 1e-4


@pytest.mark.parametrize("kwargs", [{}, {"init_image": np.zeros((64, 64, 3), np.uint8)}], ids=["txt2img", "img2img"])
def test_generate_on_an_inpainting_model_is_refused_in_one_line(sd15_inpainting, kwargs):
    _, pipe = sd15_inpainting
    with pytest.raises(PipelineError, match=REFUSAL):
        pipe.generate("a red circle", num_inference_steps=2, height=64, width=64, **kwargs)


def test_sample_cli_refuses_an_inpainting_model_in_one_line(sd15_inpainting, tmp_path, capsys):
    import sample

    folder, _ = sd15_inpainting
    args = ["--model", str(folder), "--prompt", "a red circle", "--steps", "2", "--height", "64", "--width", "64"]
    assert sample.main([*args, "--out", str(tmp_path / "out")]) == 2
    assert "this is an inpainting model (UNet in_channels 9)" in capsys.readouterr().err
    assert not (tmp_path / "out" / "0000.png").exists()


def test_save_pretrained_writes_an_inpainting_pipeline_diffusers_loads(sd15_inpainting, tmp_path):
    _, pipe = sd15_inpainting
    pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionInpaintPipeline"
    reloaded = StableDiffusionInpaintPipeline.from_pretrained(tmp_path / "saved", safety_checker=None)
    assert reloaded.unet.config.in_channels == 9
    assert sdjax.StableDiffusion.from_pretrained(tmp_path / "saved").unet.config.in_channels == 9


def test_single_file_inpainting_model_reads_nine_channels_from_conv_in(sd15_inpainting, tmp_path):
    folder, pipe = sd15_inpainting
    components = {}
    for name in ("unet", "vae", "text_encoder"):
        (file,) = (folder / name).glob("*.safetensors")
        components[name] = {k: v.numpy() for k, v in load_file(file).items()}
    file = tmp_path / "sd-v1-5-inpainting.safetensors"
    save_file(ldm_names.diffusers_to_ldm(components), str(file))
    single = sdjax.from_pretrained(file)
    assert isinstance(single, sdjax.StableDiffusion) and single.unet.config.in_channels == 9
    for a, b in zip(jax.tree.leaves(single.params["unet"]), jax.tree.leaves(pipe.params["unet"]), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(PipelineError, match=REFUSAL):
        single.generate("a red circle", num_inference_steps=2, height=64, width=64)


def test_sdxl_inpainting_folder_loads_through_both_entry_points(sdxl_inpainting):
    reference = StableDiffusionXLInpaintPipeline.from_pretrained(sdxl_inpainting)  # the fixture is a real layout
    assert reference.unet.config.in_channels == 9
    for pipe in (sdjax.StableDiffusionXL.from_pretrained(sdxl_inpainting), sdjax.from_pretrained(sdxl_inpainting)):
        assert isinstance(pipe, sdjax.StableDiffusionXL) and pipe.unet.config.in_channels == 9
        with pytest.raises(PipelineError, match=REFUSAL):
            pipe.generate("a red circle", num_inference_steps=2, height=64, width=64)


def test_sdxl_inpainting_save_pretrained_keeps_the_pipeline_class(sdxl_inpainting, tmp_path):
    sdjax.StableDiffusionXL.from_pretrained(sdxl_inpainting).save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLInpaintPipeline"


def test_sdxl_inpainting_single_file_loads_with_nine_input_channels(sdxl_inpainting, tmp_path):
    components = {}
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        (file,) = (sdxl_inpainting / name).glob("*.safetensors")
        components[name] = {k: v.numpy() for k, v in load_file(file).items()}
    file = tmp_path / "sd_xl_inpainting.safetensors"
    save_file(ldm_names_xl.diffusers_to_ldm(components), str(file))
    pipe = sdjax.from_pretrained(file, config=sdxl_inpainting)
    assert isinstance(pipe, sdjax.StableDiffusionXL) and pipe.unet.config.in_channels == 9


def test_sdxl_single_file_config_reads_nine_channels_from_conv_in():
    """Full-size SDXL shapes (no memory) with a 9-channel conv_in: the inferred UNet config says 9."""
    from tests.test_single_file_xl import _build_full_size

    full_size = _build_full_size("sdxl_base")
    unet = {**full_size.components["unet"], "conv_in.weight": np.broadcast_to(np.float16(0), (320, 9, 3, 3))}
    state = ldm_names_xl.diffusers_to_ldm({**full_size.components, "unet": unet})
    assert single_file_xl.infer_configs(state)["unet"]["in_channels"] == 9
