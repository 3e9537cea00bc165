"""Inpainting, diffusers' semantics, on both kinds of model: images within 2e-3 of StableDiffusionInpaintPipeline /
StableDiffusionXLInpaintPipeline loading the same folders (tiny random models), same prompts and noise; the mask
read and binarised as diffusers' mask processor; no recompile when image, mask or prompt change.

Both libraries sample the VAE posterior with their own random numbers; the test models' VAEs have a posterior
std of exp(-15) (quant_conv's log-variance bias set to -40, clamped to -30), so that the init latents agree."""

import inspect
import json
import shutil

import diffusers
import jax
import numpy as np
import pytest
import torch
from PIL import Image

import sdjax
from sdjax import denoise
from sdjax.errors import PipelineError
from sdjax.tasks import inpaint
from tests.reference import NEGATIVE, PROMPTS, perturb_, tiny_pipeline, tiny_sdxl_pipeline

jax.config.update("jax_default_matmul_precision", "highest")

SIZE = 16  # pixels; the tiny VAEs downsample 2x
TOLERANCE = 2e-3


def _sharp_posterior(vae, folder):
    with torch.no_grad():
        vae.quant_conv.bias[vae.config.latent_channels :] = -40.0
    vae.save_pretrained(folder / "vae", safe_serialization=True)


def _nine_channel_unet(folder, seed):
    config = {**json.loads((folder / "unet" / "config.json").read_text()), "in_channels": 9}
    shutil.rmtree(folder / "unet")
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel.from_config(config)
    perturb_(unet, seed=seed).save_pretrained(folder / "unet", safe_serialization=True)


def _retitle(folder, name):
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": name}))


@pytest.fixture(scope="module")
def sd_folders(tmp_path_factory):
    """{"4": an ordinary tiny SD folder, "9": the same with a 9-channel inpainting UNet}."""
    folders = {}
    for channels in ("4", "9"):
        folder = tmp_path_factory.mktemp(f"sd_inpaint_{channels}") / "model"
        pipe = tiny_pipeline(folder)
        _sharp_posterior(pipe.vae, folder)
        if channels == "9":
            _nine_channel_unet(folder, seed=7)
            _retitle(folder, "StableDiffusionInpaintPipeline")
        folders[channels] = folder
    return folders


def _image_and_mask():
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[3:12, 5:14] = 255  # odd edges: the latent mask takes pixel (2i, 2j), not the block's centre
    return image, Image.fromarray(mask)


def _noise(n, seed=4):
    return torch.randn((n, 4, SIZE // 2, SIZE // 2), generator=torch.Generator().manual_seed(seed))


def _diffusers_inpaint(torch_pipe, noise, monkeypatch, **kwargs):
    """diffusers' images (N, H, W, 3) with ``noise`` (NCHW) as the run's noise at every strength (a given
    ``latents`` is its start only at strength 1)."""
    module = inspect.getmodule(type(torch_pipe))
    monkeypatch.setattr(module, "randn_tensor", lambda shape, **_: noise.clone())
    return torch_pipe(**kwargs, output_type="np", generator=torch.Generator().manual_seed(0)).images


def _compare(ours, ref, what):
    error = float(np.abs(ours - ref).max())
    print(f"{what}: max abs error {error:.2e} on [0, 1] images")
    assert error <= TOLERANCE


@pytest.mark.parametrize(
    "channels, strength",
    [
        ("9", 1.0),
        pytest.param("4", 1.0, marks=pytest.mark.slow),
        pytest.param("9", 0.75, marks=pytest.mark.slow),
        ("4", 0.75),
    ],  # one fast case of each kind of model, one of each start (noise, noised init)
)
def test_sd_inpainting_matches_diffusers(sd_folders, channels, strength, monkeypatch):
    folder = sd_folders[channels]
    torch_pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(folder)
    torch_pipe.set_progress_bar_config(disable=True)
    image, mask = _image_and_mask()
    noise = _noise(2)
    common = dict(num_inference_steps=8, guidance_scale=7.5, strength=strength, height=SIZE, width=SIZE)
    ref = _diffusers_inpaint(torch_pipe, noise, monkeypatch, prompt=PROMPTS, negative_prompt=NEGATIVE, image=image,
                             mask_image=mask, **common)  # fmt: skip
    pipe = sdjax.StableDiffusion.from_pretrained(folder)
    latents = noise.permute(0, 2, 3, 1).numpy()
    ours = pipe.generate(PROMPTS, NEGATIVE, init_image=image, mask_image=mask, latents=latents, **common)
    _compare(ours, ref, f"SD {channels}-channel inpainting, strength {strength}")


@pytest.mark.slow
def test_sdxl_inpainting_matches_diffusers(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    torch_pipe = tiny_sdxl_pipeline(folder)
    _sharp_posterior(torch_pipe.vae, folder)
    _retitle(folder, "StableDiffusionXLInpaintPipeline")
    torch_pipe = diffusers.StableDiffusionXLInpaintPipeline.from_pretrained(folder)
    torch_pipe.set_progress_bar_config(disable=True)
    image, mask = _image_and_mask()
    noise = _noise(1)
    common = dict(num_inference_steps=6, guidance_scale=5.0, strength=0.9999, height=SIZE, width=SIZE)
    ref = _diffusers_inpaint(torch_pipe, noise, monkeypatch, prompt=PROMPTS[0], image=image, mask_image=mask, **common)
    pipe = sdjax.StableDiffusionXL.from_pretrained(folder)
    ours = pipe.generate(PROMPTS[0], init_image=image, mask_image=mask, latents=noise.permute(0, 2, 3, 1).numpy(),
                         **common)  # fmt: skip
    _compare(ours, ref, "SDXL 4-channel inpainting, strength 0.9999")


def test_mask_is_binarised_and_the_latent_mask_takes_pixel_2i_2j(tiny_pipe):
    mask = np.zeros((SIZE, SIZE), np.float32)
    mask[:, 5:] = 0.6  # >= 0.5: repaint
    mask[:, 9:] = 0.4  # < 0.5: keep
    prepared = inpaint.prepare(np.zeros((SIZE, SIZE, 3), np.uint8), mask, 1, SIZE, SIZE, 2, False, 1.0)
    latent = np.asarray(prepared.inputs["mask"])[0, 0, :, 0]
    np.testing.assert_array_equal(latent, [0, 0, 0, 1, 1, 0, 0, 0])  # pixels 0, 2, 4 | 6, 8 | 10...
    assert set(np.unique(latent)) <= {0.0, 1.0}


def test_masked_image_is_the_init_image_with_masked_pixels_zero():
    image = np.full((SIZE, SIZE, 3), 255, np.uint8)
    mask = np.zeros((SIZE, SIZE), bool)
    mask[:4] = True
    prepared = inpaint.prepare(image, mask, 2, SIZE, SIZE, 2, True, 1.0)
    masked = np.asarray(prepared.inputs["masked_image"])
    assert masked.shape == (2, SIZE, SIZE, 3)
    np.testing.assert_array_equal(masked[:, :4], 0.0)
    np.testing.assert_array_equal(masked[:, 4:], 1.0)  # [-1, 1]: white


def test_changing_image_mask_or_prompt_does_not_recompile(tiny_pipe):
    image, mask = _image_and_mask()
    kwargs = dict(num_inference_steps=2, height=SIZE, width=SIZE)
    first = tiny_pipe.generate(PROMPTS[:1], init_image=image, mask_image=mask, **kwargs)
    traces = denoise.TRACE_COUNT
    other_mask = Image.fromarray(255 - np.asarray(mask))
    second = tiny_pipe.generate(PROMPTS[1:], init_image=image.rotate(90), mask_image=other_mask, **kwargs)
    assert denoise.TRACE_COUNT == traces
    assert np.abs(first - second).max() > 1e-2


def test_four_channel_inpainting_keeps_the_unmasked_region(tiny_pipe):
    image, mask = _image_and_mask()
    outside = np.asarray(mask)[::2, ::2] == 0  # the latent mask: pixel (2i, 2j)
    kwargs = dict(init_image=image, mask_image=mask, num_inference_steps=4, output="latent", height=SIZE, width=SIZE)
    first = tiny_pipe.generate(PROMPTS[:1], **kwargs)[0]
    other = tiny_pipe.generate(PROMPTS[1:], **kwargs)[0]  # another prompt: the same init latents (same seed)
    np.testing.assert_allclose(first[outside], other[outside], atol=1e-5)
    assert np.abs(first[~outside] - other[~outside]).max() > 1e-2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mask_image=np.zeros((SIZE, SIZE), np.uint8)), r"^mask_image repaints init_image: pass init_image too"),
        (
            dict(init_image=np.zeros((SIZE, SIZE, 3), np.uint8), mask_image=np.zeros((8, 8), np.uint8)),
            r"^mask_image is 8x8 and init_image 16x16 \(WxH\): pass a mask of the image's size",
        ),
        (
            dict(init_image=np.zeros((SIZE, SIZE, 3), np.uint8), mask_image=np.zeros((SIZE, SIZE, 3), np.uint8)),
            r"^mask_image must be one channel",
        ),
        (
            dict(init_image=np.zeros((SIZE, SIZE, 3), np.uint8), mask_image="/nonexistent.png"),
            r"^mask image /nonexistent.png cannot be read as an image",
        ),
        (
            dict(init_image=np.zeros((1, 8, 8, 4), np.float32), mask_image=np.zeros((SIZE, SIZE), np.uint8)),
            r"^inpainting repaints an image: pass init_image as an image",
        ),
    ],  # fmt: skip
)
def test_bad_inpainting_input_is_one_line(tiny_pipe, kwargs, message):
    with pytest.raises(PipelineError, match=message):
        tiny_pipe.generate("a", num_inference_steps=2, height=SIZE, width=SIZE, **kwargs)


def test_a_nine_channel_model_without_a_mask_is_refused(sd_folders):
    pipe = sdjax.StableDiffusion.from_pretrained(sd_folders["9"])
    with pytest.raises(PipelineError, match=r"^this is an inpainting model \(UNet in_channels 9\): pass init_image"):
        pipe.generate("a", num_inference_steps=2, init_image=np.zeros((SIZE, SIZE, 3), np.uint8))


@pytest.mark.slow  # ~2 min on 2 loaded CPU cores
def test_shapes64_demo_repaints_the_circle_as_a_blue_square_and_keeps_the_rest():
    """docs/controlnet_inpainting.md's demo: the shipped model repaints a rendered red circle's region from the
    prompt "a blue square on a yellow background"; the judge reads every image as that prompt, and the pixels
    outside the mask keep the scene (the shipped VAE's decoder has a mid-block attention, so a repainted region
    changes every pixel a little. Measured over the 4 seeds: mean absolute change outside the mask 0.023-0.053 per
    image (0.038 over all), most of it in a 4-pixel band at the mask's edge; beyond it 0.006-0.011 per image)."""
    from sdjax.shapes64 import MODEL_DIR
    from sdjax.shapes64.judge import judge
    from sdjax.shapes64.scene import render

    pipe = sdjax.StableDiffusion.from_pretrained(MODEL_DIR)
    scene = render("red", "circle", "yellow", cx=32, cy=32, size=36)
    mask = np.zeros((64, 64), bool)
    mask[8:56, 8:56] = True  # on the latent grid (4-pixel blocks)
    prompts = ["a blue square on a yellow background"] * 4
    images = pipe.generate(prompts, init_image=scene, mask_image=mask, num_inference_steps=20)
    assert [judge(image) for image in images] == [{"color": "blue", "shape": "square", "background": "yellow"}] * 4
    change = np.abs(images - scene / 255.0).mean(-1)  # (4, 64, 64)
    far = np.ones((64, 64), bool)
    far[4:60, 4:60] = False  # 4 pixels or more from the mask
    print(f"outside the mask: mean abs change {change[:, ~mask].mean(1)}, beyond 4 px {change[:, far].mean(1)}")
    assert change[:, ~mask].mean() < 0.05 and change[:, ~mask].mean(1).max() < 0.1
    assert change[:, far].mean(1).max() < 0.03


def test_a_progress_bar_run_inpaints_the_same(tiny_pipe):
    """--progress runs start / one step / finish as separate programs: the tasks' derived inputs (the encoded init
    image) pass from the start program to every step."""
    image, mask = _image_and_mask()
    kwargs = dict(init_image=image, mask_image=mask, num_inference_steps=3, height=SIZE, width=SIZE, strength=0.75)
    np.testing.assert_allclose(
        tiny_pipe.generate(PROMPTS[:1], progress=True, **kwargs), tiny_pipe.generate(PROMPTS[:1], **kwargs), atol=1e-6
    )
