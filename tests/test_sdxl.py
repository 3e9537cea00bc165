"""StableDiffusionXL (base and refiner) end to end against diffusers' SDXL pipelines on the same random weights,
loaded by both from the same folders on disk."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import sdjax
from tests.reference import NEGATIVE, PROMPTS

jax.config.update("jax_default_matmul_precision", "highest")

SCHEDULERS = {
    "euler": "EulerDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "heun": "HeunDiscreteScheduler",
}
GUIDANCE = 5.0
TOLERANCE = 2e-3  # the bound on [0, 1] images; measured 1e-6 to 3e-6


@pytest.fixture(scope="module")
def base(tiny_sdxl):
    torch_pipe, folder = tiny_sdxl
    return torch_pipe, folder, sdjax.from_pretrained(folder)


@pytest.fixture(scope="module")
def refiner(tiny_sdxl_refiner):
    torch_pipe, folder = tiny_sdxl_refiner
    return torch_pipe, folder, sdjax.from_pretrained(folder)


def initial_noise(n: int = 2) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, 8, 8, 4)).astype(np.float32)


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _with_scheduler(torch_pipe, sampler: str):
    torch_pipe = copy.copy(torch_pipe)  # the module fixture's pipeline keeps its own scheduler
    torch_pipe.scheduler = getattr(diffusers, SCHEDULERS[sampler]).from_config(torch_pipe.scheduler.config)
    return torch_pipe


@pytest.mark.parametrize("steps", [30, pytest.param(50, marks=pytest.mark.slow)])
@pytest.mark.parametrize("negative", [None, NEGATIVE], ids=["no-negative", "negative"])
@pytest.mark.parametrize("sampler", list(SCHEDULERS))
def test_base_images_match_diffusers(base, sampler, negative, steps):
    torch_pipe, _, pipe = base
    latents = initial_noise()
    with torch.no_grad():
        expected = _with_scheduler(torch_pipe, sampler)(
            PROMPTS, negative_prompt=negative, num_inference_steps=steps, guidance_scale=GUIDANCE,
            latents=_nchw(latents), output_type="np",
        ).images  # fmt: skip
    images = pipe.generate(PROMPTS, negative, num_inference_steps=steps, sampler=sampler, latents=latents)
    error = np.abs(images - expected).max()
    print(f"sdxl base {sampler} {steps} steps negative={negative is not None}: max|sdjax - diffusers| = {error:.2e}")
    assert images.shape == expected.shape == (2, 16, 16, 3)
    assert error <= TOLERANCE


@pytest.mark.parametrize("sampler", list(SCHEDULERS))
def test_refiner_hand_off_matches_diffusers(base, refiner, sampler):
    """Base to 0.8 of the schedule (latents out), refiner from 0.8 on those latents: diffusers' ensemble of
    expert denoisers, high_noise_frac 0.8."""
    (torch_base, _, pipe_base), (torch_refiner, _, pipe_refiner) = base, refiner
    latents = initial_noise()
    with torch.no_grad():
        handed = _with_scheduler(torch_base, sampler)(
            PROMPTS, num_inference_steps=30, denoising_end=0.8, latents=_nchw(latents), output_type="latent"
        ).images
        expected = _with_scheduler(torch_refiner, sampler)(
            PROMPTS, num_inference_steps=30, denoising_start=0.8, image=handed, output_type="np"
        ).images
    ours = pipe_base.generate(
        PROMPTS, num_inference_steps=30, sampler=sampler, latents=latents, denoising_end=0.8, output="latent"
    )
    images = pipe_refiner.generate(
        PROMPTS, num_inference_steps=30, sampler=sampler, denoising_start=0.8, init_image=ours
    )
    latent_error = np.abs(ours - handed.numpy().transpose(0, 2, 3, 1)).max() / np.abs(handed.numpy()).max()
    error = np.abs(images - expected).max()
    print(f"sdxl hand-off {sampler}: latents rel {latent_error:.2e}, images {error:.2e}")
    assert ours.shape == (2, 8, 8, 4)
    assert latent_error <= 1e-4
    assert error <= TOLERANCE


def test_guidance_rescale_and_clip_skip_match_diffusers(base):
    torch_pipe, _, pipe = base
    latents = initial_noise()
    with torch.no_grad():
        expected = torch_pipe(
            PROMPTS, num_inference_steps=12, guidance_scale=GUIDANCE, guidance_rescale=0.7, clip_skip=1,
            latents=_nchw(latents), output_type="np",
        ).images  # fmt: skip
    images = pipe.generate(PROMPTS, num_inference_steps=12, latents=latents, guidance_rescale=0.7, clip_skip=1)
    plain = pipe.generate(PROMPTS, num_inference_steps=12, latents=latents)
    assert np.abs(images - expected).max() <= TOLERANCE
    assert np.abs(images - plain).max() > 1e-2  # both options change the image


def test_micro_conditioning_and_second_prompts_match_diffusers(base):
    torch_pipe, _, pipe = base
    latents = initial_noise()
    kwargs = dict(original_size=(512, 384), crops_coords_top_left=(16, 32), target_size=(256, 256))
    prompts_2 = ["blurry", "photo of a cat"]
    with torch.no_grad():
        expected = torch_pipe(
            PROMPTS, prompt_2=prompts_2, negative_prompt=NEGATIVE, negative_prompt_2="blurry",
            num_inference_steps=12, guidance_scale=GUIDANCE, latents=_nchw(latents), output_type="np", **kwargs,
        ).images  # fmt: skip
    images = pipe.generate(
        PROMPTS, NEGATIVE, num_inference_steps=12, latents=latents, prompts_2=prompts_2,
        negative_prompts_2="blurry", **kwargs,
    )  # fmt: skip
    assert np.abs(images - expected).max() <= TOLERANCE


def test_negative_micro_conditioning_matches_diffusers_on_one_prompt(base):
    """One prompt: with several, diffusers 0.42 tiles the [negative, positive] time-id pair over the batch
    (``add_time_ids.repeat(batch, 1)``), so its rows no longer follow the embeddings' [negatives..., positives...]
    order; sdjax gives every negative row the negative ids."""
    torch_pipe, _, pipe = base
    latents = initial_noise(1)
    negative = dict(negative_original_size=(128, 128), negative_target_size=(64, 96))
    with torch.no_grad():
        expected = torch_pipe(
            PROMPTS[:1], negative_prompt=NEGATIVE[:1], num_inference_steps=12, guidance_scale=GUIDANCE,
            latents=_nchw(latents), output_type="np", **negative,
        ).images  # fmt: skip
    images = pipe.generate(PROMPTS[:1], NEGATIVE[:1], num_inference_steps=12, latents=latents, **negative)
    plain = pipe.generate(PROMPTS[:1], NEGATIVE[:1], num_inference_steps=12, latents=latents)
    assert np.abs(images - expected).max() <= TOLERANCE
    assert np.abs(images - plain).max() > 1e-2


def test_empty_negative_prompt_is_zero_embeddings_with_force_zeros(base):
    _, _, pipe = base
    ids = (np.zeros(6, np.float32), np.zeros(6, np.float32))
    zeroed = pipe.conditions(PROMPTS, None, None, None, True, ids)["uncond"]
    assert not np.any(np.asarray(zeroed["encoder_hidden_states"])) and not np.any(np.asarray(zeroed["text_embeds"]))
    encoded = pipe.conditions(PROMPTS, None, ["", ""], None, True, ids)["uncond"]
    assert np.abs(np.asarray(encoded["encoder_hidden_states"])).max() > 0.1


def test_from_pretrained_picks_the_family(base, refiner, tiny_model):
    assert isinstance(sdjax.from_pretrained(tiny_model), sdjax.StableDiffusion)
    _, _, pipe_base = base
    _, _, pipe_refiner = refiner
    assert isinstance(pipe_base, sdjax.StableDiffusionXL) and isinstance(pipe_refiner, sdjax.StableDiffusionXL)
    assert set(pipe_base.params) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    assert set(pipe_refiner.params) == {"unet", "vae", "text_encoder_2"} and pipe_refiner.text_encoder is None
    assert pipe_refiner.requires_aesthetics_score and not pipe_refiner.force_zeros_for_empty_prompt
    assert pipe_base.default_sampler == "euler" and pipe_base.vae.config.scaling_factor == 0.13025


def test_each_class_refuses_the_other_family_in_one_line(base, tiny_model):
    _, folder, _ = base
    with pytest.raises(sdjax.PipelineError, match=r"sdjax\.StableDiffusionXL\.from_pretrained or sdjax\.from_pre"):
        sdjax.StableDiffusion.from_pretrained(folder)
    with pytest.raises(sdjax.PipelineError, match=r"sdjax\.StableDiffusion\.from_pretrained or sdjax\.from_pre"):
        sdjax.StableDiffusionXL.from_pretrained(tiny_model)


def test_force_upcast_vae_stays_float32_in_bfloat16(base):
    _, folder, _ = base
    pipe = sdjax.StableDiffusionXL.from_pretrained(folder, dtype=jnp.bfloat16)
    assert pipe.vae.dtype == jnp.float32 and pipe.unet.dtype == jnp.bfloat16
    assert {x.dtype for x in jax.tree.leaves(pipe.params["vae"])} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(pipe.params["unet"])} == {jnp.dtype(jnp.bfloat16)}
    images = pipe.generate(PROMPTS[:1], num_inference_steps=4)
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()


def test_save_pretrained_round_trips_through_diffusers(base, refiner, tmp_path):
    """sdjax writes SDXL folders (base and refiner) that diffusers loads into the same pipeline class."""
    for (torch_pipe, _, pipe), name in ((base, "base"), (refiner, "refiner")):
        pipe.save_pretrained(tmp_path / name)
        reloaded = diffusers.DiffusionPipeline.from_pretrained(tmp_path / name)
        assert type(reloaded) is type(torch_pipe)
        index = json.loads((tmp_path / name / "model_index.json").read_text())
        assert index["requires_aesthetics_score"] == pipe.requires_aesthetics_score
        original = torch_pipe.unet.state_dict()
        assert all(torch.equal(v, original[k]) for k, v in reloaded.unet.state_dict().items())
        assert type(sdjax.from_pretrained(tmp_path / name)) is sdjax.StableDiffusionXL


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda base, ref: ref.generate(PROMPTS), "works on an image: pass init_image"),
        (lambda base, ref: base.generate(PROMPTS, height=15), "multiples of 2"),
        (lambda base, ref: base.generate(PROMPTS, prompts_2=["one"]), "got 1 prompts_2 for 2 prompts"),
        (lambda base, ref: base.generate(PROMPTS, denoising_start=0.5), "pass its latents as init_image"),
        (lambda base, ref: base.generate(PROMPTS, denoising_end=1.5), r"denoising_end must be a number in \(0, 1\)"),
        (lambda base, ref: base.generate(PROMPTS, original_size=512), "original_size must be a pair"),
        (lambda base, ref: base.generate(PROMPTS, output="pil"), "output must be one of 'image', 'latent'"),
        (lambda base, ref: base.generate(PROMPTS, num_images_per_prompt=10**9), "need more than the host's"),
        (
            lambda base, ref: base.generate(PROMPTS, guidance_rescale=2.0),
            r"guidance_rescale must be a finite number in \[0, 1\], got 2.0",
        ),
        (lambda base, ref: base.generate(PROMPTS, clip_skip=7), r"clip_skip must be None or an int in \[1, 2\]"),
        (
            lambda base, ref: ref.generate(PROMPTS, init_image=np.zeros((2, 4, 4, 4), np.float32), height=16),
            r"init latents must have shape \(2, 8, 8, 4\)",
        ),
    ],
)
def test_bad_sdxl_arguments_raise_one_line(base, refiner, call, message):
    with pytest.raises(sdjax.PipelineError, match=message) as info:
        call(base[2], refiner[2])
    assert "\n" not in str(info.value)


MULTI_DEVICE_SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np, jax, sdjax
    pipe = sdjax.from_pretrained(sys.argv[1])
    images = pipe.generate(["a red circle"] * 3 + ["a green square"], num_inference_steps=4, seed=5)
    np.save(sys.argv[2], images)
    print(jax.local_device_count())
    """
)


def test_same_images_on_one_two_and_four_devices(base, tmp_path):
    _, folder, _ = base
    results = []
    for n in (1, 2, 4):
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}", "JAX_PLATFORMS": "cpu"}
        out = tmp_path / f"{n}.npy"
        proc = subprocess.run(
            [sys.executable, "-c", MULTI_DEVICE_SCRIPT, str(folder), str(out)],
            env=env,
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip().splitlines()[-1] == str(n)
        results.append(np.load(out))
    assert results[0].shape == (4, 16, 16, 3)
    for other in results[1:]:
        np.testing.assert_allclose(other, results[0], atol=1e-5)


def test_copy_of_a_folder_without_the_first_text_encoder_is_a_refiner(refiner, tmp_path):
    """The refiner's model_index lists text_encoder and tokenizer as [null, null]; nothing else is looked for."""
    _, folder, _ = refiner
    shutil.copytree(folder, tmp_path / "refiner")
    index = json.loads((tmp_path / "refiner" / "model_index.json").read_text())
    assert index["text_encoder"] == [None, None] and index["tokenizer"] == [None, None]
    assert not (tmp_path / "refiner" / "text_encoder").exists()
    assert sdjax.from_pretrained(tmp_path / "refiner").text_encoder is None


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """The published SDXL base and refiner layouts (config files as shipped, shrunk widths, random weights),
    loaded from disk by diffusers (DiffusionPipeline picks the class from model_index.json) and by sdjax."""
    from tests.published import published_folder

    out = {}
    for name in ("sdxl_base", "sdxl_refiner"):
        folder = published_folder(name, tmp_path_factory.mktemp(name) / "model")
        # float32 throughout: the published text encoder configs say torch_dtype float16, which transformers follows
        torch_pipe = diffusers.DiffusionPipeline.from_pretrained(
            folder, torch_dtype=torch.float32, local_files_only=True
        )
        torch_pipe.set_progress_bar_config(disable=True)
        out[name] = (torch_pipe, sdjax.from_pretrained(folder))
    return out


def test_published_layouts_hand_off_as_diffusers(published):
    """Base (its published Euler scheduler, no negative prompt: zeros) to 0.8 of 12 steps, then the refiner, at
    128x128 (16x16 latents), on the published SDXL layouts."""
    (torch_base, base), (torch_refiner, refiner) = published["sdxl_base"], published["sdxl_refiner"]
    latents = np.random.default_rng(0).standard_normal((2, 16, 16, 4)).astype(np.float32)
    kwargs = dict(num_inference_steps=12, height=128, width=128)
    with torch.no_grad():
        expected_base = torch_base(PROMPTS, latents=_nchw(latents), output_type="np", **kwargs).images
        handed = torch_base(PROMPTS, latents=_nchw(latents), denoising_end=0.8, output_type="latent", **kwargs).images
        expected = torch_refiner(
            PROMPTS, image=handed, denoising_start=0.8, output_type="np", num_inference_steps=12
        ).images
    images_base = base.generate(PROMPTS, latents=latents, **kwargs)
    ours = base.generate(PROMPTS, latents=latents, denoising_end=0.8, output="latent", **kwargs)
    images = refiner.generate(PROMPTS, init_image=ours, denoising_start=0.8, num_inference_steps=12)
    errors = np.abs(images_base - expected_base).max(), np.abs(images - expected).max()
    print(f"published SDXL layouts: base {errors[0]:.2e}, hand-off {errors[1]:.2e}")
    assert images.shape == expected.shape == (2, 128, 128, 3)
    assert max(errors) <= TOLERANCE
