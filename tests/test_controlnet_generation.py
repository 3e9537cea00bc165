"""ControlNet generation: images within 2e-3 of diffusers' StableDiffusionControlNetPipeline (one ControlNet; two
with different scales and a control_guidance_end < 1; guess mode) and StableDiffusionXLControlNetPipeline, both
loading the same folders (tiny random models: ControlNets made from the tiny UNets, every weight perturbed), same
prompts and initial noise; inpainting + ControlNet composed; bad input in one line; no recompile when the control
image or scale changes."""

import copy

import diffusers
import jax
import numpy as np
import pytest
import torch
from PIL import Image

import sdjax
from sdjax import denoise
from sdjax.errors import PipelineError
from tests.reference import NEGATIVE, PROMPTS, perturb_

jax.config.update("jax_default_matmul_precision", "highest")

SIZE = 16  # pixels; the tiny VAEs downsample 2x, so do these ControlNets' embeddings (two stages)
TOLERANCE = 2e-3


def _controlnet_folder(unet, folder, seed):
    torch.manual_seed(seed)
    model = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    perturb_(model, seed=seed).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def sd_controlnets(tiny_torch_pipe, tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnets")
    return [_controlnet_folder(tiny_torch_pipe.unet, root / f"cn{i}", seed=20 + i) for i in range(2)]


def _control_images(k):
    rng = np.random.default_rng(11)
    return [Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in range(k)]


def _noise(n):
    return torch.randn((n, 4, SIZE // 2, SIZE // 2), generator=torch.Generator().manual_seed(4))


def _compare(ours, ref, what):
    error = float(np.abs(ours - ref).max())
    print(f"{what}: max abs error {error:.2e} on [0, 1] images")
    assert error <= TOLERANCE


CASES = {
    "one": dict(k=1, kwargs={}),
    "two": dict(k=2, kwargs=dict(controlnet_conditioning_scale=[0.7, 1.3], control_guidance_end=0.6)),
    "guess": dict(k=1, kwargs=dict(guess_mode=True, controlnet_conditioning_scale=0.8, control_guidance_start=0.2)),
}


@pytest.mark.parametrize("case", ["one", pytest.param("two", marks=pytest.mark.slow),
                                  pytest.param("guess", marks=pytest.mark.slow)])  # fmt: skip
def test_sd_controlnet_matches_diffusers(tiny_torch_pipe, tiny_pipe, sd_controlnets, case):
    k, kwargs = CASES[case]["k"], CASES[case]["kwargs"]
    folders, images, noise = sd_controlnets[:k], _control_images(k), _noise(2)
    torch_nets = [diffusers.ControlNetModel.from_pretrained(f) for f in folders]
    torch_pipe = diffusers.StableDiffusionControlNetPipeline(
        **copy.deepcopy(tiny_torch_pipe.components), controlnet=torch_nets if k > 1 else torch_nets[0]
    )
    torch_pipe.set_progress_bar_config(disable=True)
    common = dict(num_inference_steps=6, guidance_scale=7.5, height=SIZE, width=SIZE, **kwargs)
    ref = torch_pipe(PROMPTS, negative_prompt=NEGATIVE, image=images if k > 1 else images[0], latents=noise,
                     output_type="np", **common).images  # fmt: skip
    nets = [sdjax.ControlNet.from_pretrained(f) for f in folders]
    ours = tiny_pipe.generate(PROMPTS, NEGATIVE, controlnet=nets if k > 1 else nets[0], control_image=images if k > 1
                              else images[0], latents=noise.permute(0, 2, 3, 1).numpy(), **common)  # fmt: skip
    _compare(ours, ref, f"SD ControlNet ({case})")


@pytest.mark.slow
def test_sdxl_controlnet_matches_diffusers(tiny_sdxl, tmp_path):
    torch_sdxl, folder = tiny_sdxl
    net_folder = _controlnet_folder(torch_sdxl.unet, tmp_path / "cn", seed=30)
    torch_pipe = diffusers.StableDiffusionXLControlNetPipeline(
        **copy.deepcopy(torch_sdxl.components), controlnet=diffusers.ControlNetModel.from_pretrained(net_folder)
    )
    torch_pipe.set_progress_bar_config(disable=True)
    image, noise = _control_images(1)[0], _noise(1)
    common = dict(num_inference_steps=5, guidance_scale=5.0, height=SIZE, width=SIZE, controlnet_conditioning_scale=0.9)
    ref = torch_pipe(PROMPTS[0], image=image, latents=noise, output_type="np", **common).images
    pipe = sdjax.StableDiffusionXL.from_pretrained(folder)
    ours = pipe.generate(PROMPTS[0], controlnet=sdjax.ControlNet.from_pretrained(net_folder), control_image=image,
                         latents=noise.permute(0, 2, 3, 1).numpy(), **common)  # fmt: skip
    _compare(ours, ref, "SDXL ControlNet")


def test_changing_control_image_or_scale_does_not_recompile(tiny_pipe, sd_controlnets):
    net = sdjax.ControlNet.from_pretrained(sd_controlnets[0])
    a, b = _control_images(2)
    kwargs = dict(num_inference_steps=2, height=SIZE, width=SIZE, controlnet=net)
    first = tiny_pipe.generate(PROMPTS[0], control_image=a, **kwargs)
    traces = denoise.TRACE_COUNT
    second = tiny_pipe.generate(PROMPTS[0], control_image=b, controlnet_conditioning_scale=0.5,
                                control_guidance_end=0.5, **kwargs)  # fmt: skip
    assert denoise.TRACE_COUNT == traces
    assert np.abs(first - second).max() > 1e-3


def test_inpainting_and_controlnet_compose(tiny_pipe, sd_controlnets):
    net = sdjax.ControlNet.from_pretrained(sd_controlnets[0])
    init = _control_images(2)[1]
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:, 8:] = 255
    kwargs = dict(num_inference_steps=3, height=SIZE, width=SIZE, init_image=init, mask_image=mask, output="latent")
    plain = tiny_pipe.generate(PROMPTS[0], **kwargs)
    controlled = tiny_pipe.generate(PROMPTS[0], controlnet=net, control_image=_control_images(1)[0], **kwargs)
    np.testing.assert_allclose(plain[:, :, :4], controlled[:, :, :4], atol=1e-5)  # outside the mask: the init
    assert np.abs(plain[:, :, 4:] - controlled[:, :, 4:]).max() > 1e-3  # inside: the ControlNet steers


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(control_image="IMAGES"), r"^controlnet must be an sdjax.ControlNet or a list of them"),
        (dict(controlnet="NETS"), r"^controlnet must be an sdjax.ControlNet or a list of them"),
        (dict(controlnet="NET", control_image=["IMAGE", "IMAGE"]), r"^got 2 control image\(s\) for 1 ControlNet"),
        (
            dict(controlnet="NET", control_image="IMAGE", controlnet_conditioning_scale=[1.0, 0.5]),
            r"^got 2 controlnet_conditioning_scale values for 1 ControlNet",
        ),
        (dict(controlnet="NET", control_image="/nonexistent.png"), r"^control image /nonexistent.png cannot be read"),
        (
            dict(controlnet="NET", control_image="IMAGE", control_guidance_start=0.7, control_guidance_end=0.3),
            r"^control_guidance_start \[0.7\] must be below control_guidance_end \[0.3\]",
        ),
    ],  # fmt: skip
)
def test_bad_controlnet_input_is_one_line(tiny_pipe, sd_controlnets, kwargs, message):
    net, image = sdjax.ControlNet.from_pretrained(sd_controlnets[0]), _control_images(1)[0]
    named = {"NET": net, "IMAGE": image}
    kwargs = {k: [named.get(x, x) for x in v] if isinstance(v, list) else named.get(v, v) for k, v in kwargs.items()}
    with pytest.raises(PipelineError, match=message):
        tiny_pipe.generate("a", num_inference_steps=2, height=SIZE, width=SIZE, **kwargs)


def test_a_controlnet_of_another_family_is_refused(tiny_sdxl, tiny_pipe, tmp_path):
    net = sdjax.ControlNet.from_pretrained(_controlnet_folder(tiny_sdxl[0].unet, tmp_path / "cn", seed=3))
    with pytest.raises(PipelineError, match=r"is an SDXL ControlNet and the pipeline is SD 1.x/2.x"):
        tiny_pipe.generate("a", num_inference_steps=2, controlnet=net, control_image=_control_images(1)[0])
