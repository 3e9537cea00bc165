"""Published SD 1.5 / 2.1 folders (config files as published, shrunk widths, random weights): sdjax's images
equal diffusers' for every deterministic sampler, with schedulers swapped in diffusers as users do
(``EulerDiscreteScheduler.from_config(pipe.scheduler.config)``), so that a field the published scheduler config
leaves out takes the default of the class that runs in both libraries."""

from __future__ import annotations

from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch

import sdjax
from tests.published import diffusers_pipeline, published_folder
from tests.test_samplers import ORIGINAL

SIZE = 128  # pixels: 16x16 latents, 2x2 at the bottom of the published 4-block UNet (GroupNorm needs > 1 value)
PROMPTS = [
    "a photograph of an astronaut riding a horse on mars, dramatic lighting, ultra detailed, volumetric clouds, "
    "crépuscule doré, 東京の夜景, 🐴🚀, by a famous photographer, trending on artstation, 8k, sharp focus, "
    "award winning, cinematic composition, wide angle, golden hour, film grain, bokeh, highly detailed skin, "
    "intricate armour, reflections in the visor, red dust storm on the horizon",  # > 77 tokens
    "un café à Paris, crème brûlée",
]
NEGATIVE = ["", "blurry, low quality, jpeg artifacts"]
# The first seven samplers' deterministic cases, with and without Karras sigmas (the newer samplers' published-config
# parity: tests/test_sampler_pipelines.py).
CASES = [case[:2] for case in ORIGINAL]
DIFFUSERS_CLASS = {
    "ddim": diffusers.DDIMScheduler,
    "pndm": diffusers.PNDMScheduler,
    "euler": diffusers.EulerDiscreteScheduler,
    "dpmpp_2m": diffusers.DPMSolverMultistepScheduler,
    "heun": diffusers.HeunDiscreteScheduler,
}
ATOL = 1e-4  # on [0, 1] images (measured <= 2e-5 at 12 steps; the acceptance bar is 2e-3)


def _ids(case) -> str:
    return f"{case[0]}-karras" if case[1] else case[0]


@pytest.fixture(scope="module", params=["sd15", "sd21"])
def layout(request, tmp_path_factory):
    folder = published_folder(request.param, tmp_path_factory.mktemp(request.param) / "model")
    return request.param, diffusers_pipeline(folder), sdjax.StableDiffusion.from_pretrained(folder), folder


@pytest.fixture(scope="module", params=["sd15", "sd21"])
def full_size_layout(request, tmp_path_factory):
    folder = published_folder(request.param, tmp_path_factory.mktemp(request.param) / "model", shrink=False)
    return request.param, diffusers_pipeline(folder), sdjax.StableDiffusion.from_pretrained(folder), folder


def _noise(seed: int = 0, size: int = SIZE) -> np.ndarray:
    shape = (len(PROMPTS), size // 8, size // 8, 4)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _diffusers_images(pipe, sampler: str, karras: bool, steps: int, size: int = SIZE) -> np.ndarray:
    published = pipe.scheduler
    extra = {"use_karras_sigmas": True} if karras else {}
    pipe.scheduler = DIFFUSERS_CLASS[sampler].from_config(published.config, **extra)
    try:
        latents = torch.from_numpy(_noise(size=size)).permute(0, 3, 1, 2)
        return pipe(
            prompt=PROMPTS,
            negative_prompt=NEGATIVE,
            num_inference_steps=steps,
            guidance_scale=7.5,
            height=size,
            width=size,
            latents=latents,
            output_type="np",
        ).images
    finally:
        pipe.scheduler = published


def _check(layout, sampler: str, karras: bool, steps: int, size: int = SIZE) -> None:
    name, pipe, ours, _ = layout
    ref = _diffusers_images(pipe, sampler, karras, steps, size)
    with pytest.warns(UserWarning, match="truncated"):
        images = ours.generate(
            PROMPTS,
            negative_prompts=NEGATIVE,
            num_inference_steps=steps,
            guidance_scale=7.5,
            sampler=sampler,
            height=size,
            width=size,
            latents=_noise(size=size),
            use_karras_sigmas=karras or None,
        )
    error = float(np.abs(images - ref).max())
    print(f"{name} {_ids((sampler, karras))} {steps} steps {size}px: max abs {error:.2e}")
    assert error <= ATOL


def _single_file(folder, out):
    """The published-layout folder written as an original LDM single file (what civitai-style files hold)."""
    from safetensors.numpy import save_file
    from safetensors.torch import load_file

    from sdjax.loading.ldm_names import diffusers_to_ldm

    components = {}
    for name in ("unet", "vae", "text_encoder"):
        (file,) = (folder / name).glob("*.safetensors")
        components[name] = {k: v.numpy() for k, v in load_file(file).items()}
    save_file(diffusers_to_ldm(components), str(out))
    return out


def test_single_file_samples_with_no_tokenizer_argument(layout, tmp_path):
    name, pipe, ours, _ = layout
    file = _single_file(ours_folder(layout), tmp_path / f"{name}.safetensors")
    prediction_type = "v_prediction" if name == "sd21" else None
    single = sdjax.StableDiffusion.from_pretrained(file, prediction_type=prediction_type)
    assert single.tokenizer.pad_token == ("!" if name == "sd21" else "<|endoftext|>")
    assert single.schedule.to_dict() == ours.schedule.to_dict()  # the published scheduler config of the family
    kwargs = dict(negative_prompts=NEGATIVE, num_inference_steps=2, sampler="euler", height=SIZE, width=SIZE)
    with pytest.warns(UserWarning, match="truncated"):
        a = single.generate(PROMPTS, latents=_noise(), **kwargs)
    with pytest.warns(UserWarning, match="truncated"):
        b = ours.generate(PROMPTS, latents=_noise(), **kwargs)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_sample_cli_takes_a_single_file_without_tokenizer(layout, tmp_path, capsys):
    import sample

    name, _, ours, _ = layout
    if name == "sd15":
        pytest.skip("the library test covers SD 1.5 single files; the CLI runs the SD 2.1 one (v-prediction, '!')")
    file = _single_file(ours_folder(layout), tmp_path / f"{name}.safetensors")
    args = ["--model", str(file), "--prompt", "a red circle", "--steps", "2", "--height", "64", "--width", "64"]
    if name == "sd21":
        args += ["--prediction-type", "v_prediction"]
    assert sample.main([*args, "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "0000.png").is_file()


def ours_folder(layout) -> Path:
    return layout[3]


# In the default suite: every case on the SD 1.5 layout, and on SD 2.1 one of each sampler family; the rest of
# the 12-step matrix and all 50-step runs are in the slow set (`-m slow`).
DEFAULT_SD21 = {("ddim", False), ("euler", False), ("dpmpp_2m", True), ("heun", False)}


def _matrix():
    for name in ("sd15", "sd21"):
        for steps in (12, 50):
            for case in CASES:
                slow = steps == 50 or (name == "sd21" and case not in DEFAULT_SD21)
                marks = [pytest.mark.slow] if slow else []
                yield pytest.param(name, case, steps, marks=marks, id=f"{name}-{_ids(case)}-{steps}")


@pytest.mark.parametrize("layout, case, steps", list(_matrix()), indirect=["layout"])
def test_images_match_diffusers_on_the_published_layout(layout, case, steps):
    _check(layout, *case, steps)


@pytest.mark.slow
@pytest.mark.parametrize("case", [("euler", False), ("dpmpp_2m", True), ("ddim", False)], ids=_ids)
def test_full_size_images_match_diffusers_on_the_published_layout(full_size_layout, case):
    """The published networks at full size (random weights), 256x256 to keep the CPU time in minutes."""
    _check(full_size_layout, *case, steps=12, size=256)
