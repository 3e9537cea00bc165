"""Inpainting and ControlNet generation on the published config layouts (shrunk widths, perturbed random weights):
runwayml/stable-diffusion-inpainting (9-channel UNet) and SD 1.5 with lllyasviel/control_v11p_sd15_canny, within
2e-3 of diffusers' pipelines loading the same folders, same prompts and noise (DDIM on both)."""

import inspect

import diffusers
import jax
import numpy as np
import pytest
import torch
from PIL import Image

import sdjax
from tests.published import published_controlnet_folder, published_folder
from tests.reference import PROMPTS

jax.config.update("jax_default_matmul_precision", "highest")

SIZE = 64  # pixels: 8x8 latents
NO_SAFETY = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
COMMON = dict(num_inference_steps=4, guidance_scale=7.5, height=SIZE, width=SIZE)


def _sharp_posterior(folder):
    """The VAE's posterior std exp(-15), so that both libraries' init latents agree (each samples its own noise)."""
    vae = diffusers.AutoencoderKL.from_pretrained(folder / "vae")
    with torch.no_grad():
        vae.quant_conv.bias[vae.config.latent_channels :] = -40.0
    vae.save_pretrained(folder / "vae", safe_serialization=True)


def _images(k, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in range(k)]


def _ddim(pipe):
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _error(ours, ref, what):
    error = float(np.abs(ours - ref).max())
    print(f"{what}: max abs error {error:.2e} on [0, 1] images")
    return error


@pytest.mark.slow
def test_published_sd15_inpainting_matches_diffusers(tmp_path, monkeypatch):
    folder = published_folder("sd15_inpainting", tmp_path / "model")
    _sharp_posterior(folder)
    torch_pipe = _ddim(diffusers.StableDiffusionInpaintPipeline.from_pretrained(folder, **NO_SAFETY))
    image = _images(1)[0]
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[10:50, 20:60] = 255
    noise = torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(4))
    monkeypatch.setattr(inspect.getmodule(type(torch_pipe)), "randn_tensor", lambda shape, **_: noise.clone())
    ref = torch_pipe(PROMPTS[0], image=image, mask_image=Image.fromarray(mask), output_type="np", **COMMON).images
    ours = sdjax.StableDiffusion.from_pretrained(folder).generate(
        PROMPTS[0], init_image=image, mask_image=mask, sampler="ddim", latents=noise.permute(0, 2, 3, 1).numpy(),
        **COMMON,
    )  # fmt: skip
    assert _error(ours, ref, "published sd15_inpainting") <= 2e-3


@pytest.mark.slow
def test_published_sd15_canny_controlnet_matches_diffusers(tmp_path):
    folder = published_folder("sd15", tmp_path / "model")
    net_folder = published_controlnet_folder("controlnet_sd15_canny", tmp_path / "controlnet")
    torch_net = diffusers.ControlNetModel.from_pretrained(net_folder)
    torch_pipe = _ddim(diffusers.StableDiffusionControlNetPipeline.from_pretrained(folder, controlnet=torch_net,
                                                                                   **NO_SAFETY))  # fmt: skip
    image = _images(1, seed=2)[0]
    noise = torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(5))
    kwargs = dict(controlnet_conditioning_scale=0.8, control_guidance_end=0.75, **COMMON)
    ref = torch_pipe(PROMPTS[0], image=image, latents=noise, output_type="np", **kwargs).images
    ours = sdjax.StableDiffusion.from_pretrained(folder).generate(
        PROMPTS[0], controlnet=sdjax.ControlNet.from_pretrained(net_folder), control_image=image, sampler="ddim",
        latents=noise.permute(0, 2, 3, 1).numpy(), **kwargs,
    )  # fmt: skip
    assert _error(ours, ref, "published sd15 + control_v11p_sd15_canny") <= 2e-3
