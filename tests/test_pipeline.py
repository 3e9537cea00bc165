"""StableDiffusion end to end against diffusers' StableDiffusionPipeline on the same random weights."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

import sdjax
from sdjax import denoise
from tests.reference import NEGATIVE, PROMPTS, tiny_pipeline

jax.config.update("jax_default_matmul_precision", "highest")

STEPS, GUIDANCE = 50, 7.5
DIFFUSERS_SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
}


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def reference(request, tmp_path_factory):
    if request.param == "epsilon":  # the default tiny model, shared by the session (tests/conftest.py)
        torch_pipe = copy.deepcopy(request.getfixturevalue("tiny_torch_pipe"))  # diffusers_images swaps its scheduler
        return torch_pipe, request.getfixturevalue("tiny_model"), request.getfixturevalue("tiny_pipe")
    folder = tmp_path_factory.mktemp(f"sd_{request.param}")
    torch_pipe = tiny_pipeline(folder, sd2=True, prediction_type=request.param)  # SD 2.x is the v-prediction family
    return torch_pipe, folder, sdjax.StableDiffusion.from_pretrained(folder)


def initial_noise(n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 8, 8, 4)).astype(np.float32)


def diffusers_images(torch_pipe, sampler: str, latents: np.ndarray) -> np.ndarray:
    import diffusers

    name, kwargs = DIFFUSERS_SCHEDULERS[sampler]
    torch_pipe.scheduler = getattr(diffusers, name).from_config(torch_pipe.scheduler.config, **kwargs)
    with torch.no_grad():
        return torch_pipe(
            PROMPTS,
            negative_prompt=NEGATIVE,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()),
            output_type="np",
        ).images


# pndm, euler and heun also run against diffusers on the published SD 1.5 / 2.1 layouts in the default suite
# (tests/test_published_layouts.py); here they are in the slow set.
SLOW_SAMPLERS = {"pndm", "euler", "heun"}


@pytest.mark.parametrize(
    "sampler", [pytest.param(s, marks=[pytest.mark.slow] if s in SLOW_SAMPLERS else []) for s in DIFFUSERS_SCHEDULERS]
)
def test_images_match_diffusers(reference, sampler):
    torch_pipe, _, pipe = reference
    latents = initial_noise()
    expected = diffusers_images(torch_pipe, sampler, latents)
    images = pipe.generate(
        PROMPTS, NEGATIVE, num_inference_steps=STEPS, guidance_scale=GUIDANCE, sampler=sampler, latents=latents
    )
    error = np.abs(images - expected).max()
    print(f"{pipe.schedule.prediction_type} {sampler}: max|sdjax - diffusers| = {error:.2e}")
    assert images.shape == expected.shape == (2, 16, 16, 3)
    assert error <= 1e-4  # the issue asks for 2e-3; measured ~2e-6


def test_from_pretrained_exposes_design_api(reference):
    _, _, pipe = reference
    assert set(pipe.params) == {"unet", "vae", "text_encoder"}
    assert pipe.tokenizer("a red circle").input_ids[0] == pipe.tokenizer.bos_token_id
    assert pipe.encode_prompt(PROMPTS).shape == (2, 77, 64)


def test_changing_prompt_seed_guidance_and_eta_does_not_recompile(reference):
    _, _, pipe = reference
    kwargs = dict(num_inference_steps=4, sampler="ddim", height=16, width=16)
    first = pipe.generate(PROMPTS, seed=0, guidance_scale=7.5, eta=0.0, **kwargs)
    traces = denoise.TRACE_COUNT
    second = pipe.generate(PROMPTS[::-1], NEGATIVE, seed=1, guidance_scale=3.0, eta=0.5, **kwargs)
    assert denoise.TRACE_COUNT == traces
    assert pipe.last_timings["compile_s"] == 0.0
    assert not np.allclose(first, second)


def test_guidance_one_skips_unconditional_branch(reference):
    _, _, pipe = reference
    kwargs = dict(num_inference_steps=3, seed=3)
    with_negative = pipe.generate(PROMPTS, NEGATIVE, guidance_scale=1.0, **kwargs)
    without = pipe.generate(PROMPTS, guidance_scale=1.0, **kwargs)
    np.testing.assert_array_equal(with_negative, without)


def test_image_noise_depends_only_on_seed_and_index(reference):
    _, _, pipe = reference
    kwargs = dict(num_inference_steps=3, seed=7, guidance_scale=2.0)
    three = pipe.generate([PROMPTS[0]] * 3, **kwargs)
    two = pipe.generate([PROMPTS[0]] * 2, **kwargs)
    np.testing.assert_allclose(three[:2], two, atol=1e-6)
    assert not np.allclose(three[0], three[1])


def test_num_images_per_prompt_repeats_each_prompt(reference):
    _, _, pipe = reference
    images = pipe.generate(PROMPTS, num_images_per_prompt=2, num_inference_steps=2, seed=0)
    assert images.shape == (4, 16, 16, 3)
    assert 0.0 <= images.min() and images.max() <= 1.0


def test_img2img_keeps_structure_of_init_image(reference, tmp_path):
    """The result moves away from what the init image gives as strength grows: d(0.2) < d(0.4) < d(1.0), d being the
    mean |pixel difference| (8 images of one call, each with its own noise) to the same seed's images at strength 0.1
    (one step of ten: the least noise img2img adds here, the low-noise limit). And that limit depends on the init's
    content: swapping the init's black and white halves moves it. Not measured against decode(encode(init)): the
    random-weight VAE does not reconstruct, and its posterior's std (~0.99) dwarfs its mean (~0.29), so the
    sampled latents are mostly the seed's posterior noise. Measured (epsilon / v-prediction, seed 0):
    d = 0.225, 0.263, 0.284 / 0.225, 0.259, 0.280; halves swapped 0.145 / 0.145. Over seeds 0-11 the smallest
    d(0.4) / d(0.2) was 1.13, d(1.0) / d(0.4) 1.06, the halves swapped 0.13."""
    from PIL import Image

    _, _, pipe = reference
    init = np.zeros((16, 16, 3), np.uint8)
    init[:, 8:] = 255
    path = tmp_path / "init.png"
    Image.fromarray(init).save(path)
    kwargs = dict(num_inference_steps=10, guidance_scale=1.0, seed=0, num_images_per_prompt=8)
    limit = pipe.generate(PROMPTS[:1], init_image=str(path), strength=0.1, **kwargs)
    assert limit.shape == (8, 16, 16, 3) and np.isfinite(limit).all()

    def distance(image, strength):
        return float(np.abs(pipe.generate(PROMPTS[:1], init_image=image, strength=strength, **kwargs) - limit).mean())

    d = {strength: distance(init, strength) for strength in (0.2, 0.4, 1.0)}
    swapped = distance(255 - init, 0.1)
    print(f"{pipe.schedule.prediction_type}: d(strength) = {d}, halves swapped {swapped:.4f}")
    assert 1.05 * d[0.2] < d[0.4] and 1.02 * d[0.4] < d[1.0]
    assert swapped > 0.05


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(height=21), "multiples of 2"),
        (dict(num_inference_steps=0), "steps"),
        (dict(sampler="k_lms"), "ddim"),
        (dict(init_image=np.zeros((16, 16, 3), np.uint8), strength=1.5), "strength"),
        (dict(negative_prompts=["a", "b", "c"]), "3 negative prompts for 2 prompts"),
        (dict(init_image="/nonexistent.png"), "cannot be read"),
        (dict(latents=np.zeros((2, 4, 4, 4), np.float32)), "latents must have shape"),
    ],
)
def test_bad_generate_arguments_raise_one_clear_error(reference, kwargs, message):
    _, _, pipe = reference
    with pytest.raises(ValueError, match=message):
        pipe.generate(PROMPTS, **kwargs)


def test_empty_prompt_list_is_an_error(reference):
    with pytest.raises(ValueError, match="prompts must be a string or a non-empty list"):
        reference[2].generate([])


def test_save_pretrained_round_trips_through_diffusers(reference, tmp_path):
    from diffusers import StableDiffusionPipeline

    torch_pipe, _, pipe = reference
    pipe.save_pretrained(tmp_path / "export")
    reloaded = StableDiffusionPipeline.from_pretrained(tmp_path / "export", safety_checker=None)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([pipe.tokenizer(PROMPTS[0], padding="max_length", max_length=77).input_ids])
    with torch.no_grad():
        for a, b in [
            (torch_pipe.unet(x, 10, context).sample, reloaded.unet(x, 10, context).sample),
            (torch_pipe.vae.decode(x).sample, reloaded.vae.decode(x).sample),
            (torch_pipe.text_encoder(ids)[0], reloaded.text_encoder(ids)[0]),
        ]:
            assert (a - b).abs().max().item() <= 1e-6 * max(1.0, a.abs().max().item())


def test_path_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        sdjax.StableDiffusion.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="no model_index.json"):
        sdjax.StableDiffusion.from_pretrained(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionKandinskyPipeline"}))
    with pytest.raises(ValueError, match="'StableDiffusionKandinskyPipeline'; supported: StableDiffusionPipeline"):
        sdjax.StableDiffusion.from_pretrained(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(ValueError, match="StableDiffusionXLPipeline folder .* sdjax.StableDiffusionXL.from_pretrained"):
        sdjax.StableDiffusion.from_pretrained(tmp_path)
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}
    index |= {"vae": ["diffusers", "AutoencoderTiny"], "text_encoder": ["transformers", "CLIPTextModel"]}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="component 'vae' is 'AutoencoderTiny'; sdjax supports 'AutoencoderKL'"):
        sdjax.StableDiffusion.from_pretrained(tmp_path)


MULTI_DEVICE_SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np, jax, sdjax
    pipe = sdjax.StableDiffusion.from_pretrained(sys.argv[1])
    images = {
        sampler: pipe.generate(["a red circle"] * 3 + ["a green square"], num_inference_steps=4, sampler=sampler,
                               seed=5, guidance_scale=5.0, eta=1.0)
        for sampler in sys.argv[3:]
    }
    np.savez(sys.argv[2], **images)
    print(jax.local_device_count())
    """
)


def test_same_images_on_one_two_and_four_devices(reference, tmp_path):
    """A deterministic sampler and two stochastic ones, Gaussian and Brownian (their per-step noise must not depend on
    the device count)."""
    _, folder, _ = reference
    if "v_prediction" in str(folder):
        pytest.skip("one model is enough for the device check")
    samplers = ("ddim", "euler_ancestral", "dpmpp_sde")
    results = []
    for n in (1, 2, 4):
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}", "JAX_PLATFORMS": "cpu"}
        out = tmp_path / f"{n}.npz"
        proc = subprocess.run(
            [sys.executable, "-c", MULTI_DEVICE_SCRIPT, str(folder), str(out), *samplers],
            env=env,
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip().splitlines()[-1] == str(n)
        results.append(np.load(out))
    for sampler in samplers:
        assert results[0][sampler].shape[0] == 4 and np.isfinite(results[0][sampler]).all()
        for other in results[1:]:
            np.testing.assert_allclose(other[sampler], results[0][sampler], atol=1e-5, err_msg=sampler)


def test_single_file_checkpoint_generates_what_the_folder_does(reference, tmp_path):
    from safetensors.numpy import save_file

    from sdjax.loading.ldm_names import diffusers_to_ldm

    torch_pipe, folder, pipe = reference
    if pipe.unet.config.use_linear_projection:
        pytest.skip("single files infer SD 2.x's 64-dim heads, which the tiny SD2-style model does not have")
    components = {
        name: {k: v.numpy() for k, v in getattr(torch_pipe, name).state_dict().items()}
        for name in ("unet", "vae", "text_encoder")
    }
    save_file(diffusers_to_ldm(components), str(tmp_path / "model.safetensors"))
    single = sdjax.StableDiffusion.from_pretrained(
        tmp_path / "model.safetensors",
        tokenizer_path=folder / "tokenizer",
        prediction_type=pipe.schedule.prediction_type,
    )
    kwargs = dict(num_inference_steps=3, seed=0, latents=initial_noise(), height=16, width=16)
    np.testing.assert_allclose(single.generate(PROMPTS, **kwargs), pipe.generate(PROMPTS, **kwargs), atol=1e-5)


def test_bfloat16_pipeline_stays_close_to_float32(reference):
    import jax.numpy as jnp

    _, folder, pipe = reference
    half = sdjax.StableDiffusion.from_pretrained(folder, dtype=jnp.bfloat16)
    assert jax.tree.leaves(half.params["unet"])[0].dtype == jnp.bfloat16
    kwargs = dict(num_inference_steps=10, seed=0, latents=initial_noise())
    error = np.abs(half.generate(PROMPTS, **kwargs) - pipe.generate(PROMPTS, **kwargs)).mean()
    assert error < 0.05  # mean abs pixel difference; sampler state stays float32


def test_progress_bar_changes_nothing(reference, capsys):
    _, _, pipe = reference
    kwargs = dict(num_inference_steps=3, seed=2)
    np.testing.assert_array_equal(pipe.generate(PROMPTS, progress=True, **kwargs), pipe.generate(PROMPTS, **kwargs))
    assert "sampling" in capsys.readouterr().err
