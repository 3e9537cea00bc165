"""Few-step models as users run them, against diffusers on tiny random-weight models loaded from disk by both:
an LCM-distilled UNet (``time_cond_proj_dim``: the guidance scale embedded, no unconditional branch), an LCM-LoRA
(``load_lora_weights`` + ``sampler="lcm"``, 4 steps, guidance 1.0), TCD, SDXL-Lightning-style euler with
trailing spacing given per call (``scheduler_config``), and the CLI's ``--scheduler-config``. The multi-step
consistency samplers draw noise at every step: diffusers' draws are replaced by sdjax's per-image noise."""

from __future__ import annotations

import copy
import inspect

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
from tests.test_lora import UNET_TARGETS, _allow_peft_0_21, _to_kohya

jax.config.update("jax_default_matmul_precision", "highest")

ATOL = 2e-3
LCM_LORA_TARGETS = UNET_TARGETS + ["conv_shortcut", "time_emb_proj"]  # as LCM-LoRA's training script


def _noise(n: int = 2) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, 8, 8, 4)).astype(np.float32)


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def sdjax_step_noise(seed: int, n: int, evaluations: int, shape=(8, 8, 4)) -> list[torch.Tensor]:
    """The Gaussian noise sdjax's sampler draws at each evaluation for images 0..n-1 of ``seed`` (NCHW)."""
    keys = jax.vmap(lambda k: jax.random.fold_in(k, denoise.SAMPLER))(denoise.image_keys(seed, n))
    draw = jax.vmap(lambda key, i: jax.random.normal(jax.random.fold_in(key, i), shape), in_axes=(0, None))
    return [_nchw(np.asarray(draw(keys, i))) for i in range(evaluations)]


def _with_sdjax_noise(monkeypatch, scheduler, seed: int, n: int, evaluations: int) -> None:
    """diffusers' scheduler module draws sdjax's noise, in order, one draw per evaluation that draws."""
    draws = iter(sdjax_step_noise(seed, n, evaluations))
    monkeypatch.setattr(inspect.getmodule(type(scheduler)), "randn_tensor", lambda *a, **k: next(draws))


# ------------------------------------------------------------------------------------------------ LCM-distilled UNet


@pytest.fixture(scope="module")
def lcm_model(tiny_torch_pipe, tmp_path_factory):
    """A tiny LatentConsistencyModelPipeline folder: the tiny SD model's UNet with ``time_cond_proj_dim`` 16
    (random, perturbed) and an LCMScheduler."""
    parts = copy.deepcopy(tiny_torch_pipe.components)
    config = {k: v for k, v in parts["unet"].config.items() if not k.startswith("_")} | {"time_cond_proj_dim": 16}
    torch.manual_seed(5)
    unet = perturb_(diffusers.UNet2DConditionModel.from_config(config), seed=5)
    scheduler = diffusers.LCMScheduler.from_config(parts["scheduler"].config)
    torch_pipe = diffusers.LatentConsistencyModelPipeline(
        vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"], unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    torch_pipe.set_progress_bar_config(disable=True)
    folder = tmp_path_factory.mktemp("lcm")
    torch_pipe.save_pretrained(folder, safe_serialization=True)
    return torch_pipe, sdjax.from_pretrained(folder)


@pytest.mark.parametrize("steps, guidance", [(4, 8.0), pytest.param(1, 3.0, marks=pytest.mark.slow)])
def test_lcm_distilled_unet_matches_latent_consistency_pipeline(lcm_model, steps, guidance, monkeypatch):
    torch_pipe, pipe = lcm_model
    _with_sdjax_noise(monkeypatch, torch_pipe.scheduler, 0, 2, steps)
    with torch.no_grad():
        expected = torch_pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, latents=_nchw(_noise()),
                              output_type="np").images  # fmt: skip
    images = pipe.generate(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, sampler="lcm", latents=_noise())
    error = float(np.abs(images - expected).max())
    print(f"LCM UNet {steps} steps guidance {guidance}: max|sdjax - diffusers| = {error:.2e}")
    assert error <= ATOL


def test_lcm_distilled_unet_embeds_the_guidance_scale_without_recompiling(lcm_model):
    _, pipe = lcm_model
    kwargs = dict(num_inference_steps=4, sampler="lcm", latents=_noise())  # the parity test's program
    first = pipe.generate(PROMPTS, guidance_scale=8.0, **kwargs)
    traces = denoise.TRACE_COUNT
    second = pipe.generate(PROMPTS, guidance_scale=2.0, **kwargs)
    assert denoise.TRACE_COUNT == traces and np.abs(first - second).max() > 1e-3
    with pytest.raises(PipelineError, match="embeds the guidance scale .* negative prompts have no effect"):
        pipe.generate(PROMPTS, NEGATIVE, **kwargs)


# ------------------------------------------------------------------------------------------------ LCM-LoRA and TCD


@pytest.fixture(scope="module")
def lcm_lora(tiny_torch_pipe, tmp_path_factory):
    """An LCM-LoRA-shaped kohya file for the tiny model (attention, feed-forward, projections, every ResNet conv
    and time embedding projection), made with PEFT."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from safetensors.numpy import save_file

    torch.manual_seed(6)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=LCM_LORA_TARGETS, init_lora_weights=False)
    unet = inject_adapter_in_model(config, copy.deepcopy(tiny_torch_pipe.unet))
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(unet).items()}
    path = tmp_path_factory.mktemp("lcm_lora") / "lcm_lora.safetensors"
    save_file(_to_kohya(state, {}, 4.0), str(path))
    return path


def test_lcm_lora_matches_diffusers(tiny_torch_pipe, tiny_model, lcm_lora, monkeypatch):
    """As the LCM-LoRA model card: load_lora_weights, LCMScheduler, 4 steps, guidance 1.0."""
    _allow_peft_0_21()
    torch_pipe = copy.deepcopy(tiny_torch_pipe)
    torch_pipe.scheduler = diffusers.LCMScheduler.from_config(torch_pipe.scheduler.config)
    torch_pipe.load_lora_weights(lcm_lora)
    _with_sdjax_noise(monkeypatch, torch_pipe.scheduler, 0, 2, 4)
    with torch.no_grad():
        expected = torch_pipe(PROMPTS, num_inference_steps=4, guidance_scale=1.0, latents=_nchw(_noise()),
                              output_type="np").images  # fmt: skip
    pipe = sdjax.StableDiffusion.from_pretrained(tiny_model)
    pipe.load_lora_weights(lcm_lora)
    images = pipe.generate(PROMPTS, num_inference_steps=4, guidance_scale=1.0, sampler="lcm", latents=_noise())
    error = float(np.abs(images - expected).max())
    print(f"LCM-LoRA 4 steps: max|sdjax - diffusers| = {error:.2e}")
    assert error <= ATOL


@pytest.mark.parametrize("gamma", [pytest.param(0.0, marks=pytest.mark.slow), 0.3])  # 0: test_sampler_pipelines
def test_tcd_matches_diffusers(tiny_torch_pipe, tiny_pipe, gamma, monkeypatch):
    """TCD at 4 steps, its gamma being the pipelines' eta (deterministic at 0)."""
    torch_pipe = copy.deepcopy(tiny_torch_pipe)
    torch_pipe.scheduler = diffusers.TCDScheduler.from_config(torch_pipe.scheduler.config)
    _with_sdjax_noise(monkeypatch, torch_pipe.scheduler, 0, 2, 4)
    with torch.no_grad():
        expected = torch_pipe(PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=3.0, eta=gamma,
                              latents=_nchw(_noise()), output_type="np").images  # fmt: skip
    images = tiny_pipe.generate(PROMPTS, NEGATIVE, num_inference_steps=4, guidance_scale=3.0, sampler="tcd",
                                eta=gamma, latents=_noise())  # fmt: skip
    assert float(np.abs(images - expected).max()) <= ATOL


def test_tcd_refuses_a_gamma_above_one(tiny_pipe):
    with pytest.raises(PipelineError, match=r"tcd takes eta \(its gamma\) in \[0, 1.0\], got 1.5"):
        tiny_pipe.generate(PROMPTS, num_inference_steps=2, sampler="tcd", eta=1.5)


# ------------------------------------------------------------------------------------------------ scheduler_config


def test_sdxl_lightning_style_trailing_euler_per_call_matches_diffusers(tiny_sdxl):
    """SDXL-Lightning's recipe: EulerDiscreteScheduler with timestep_spacing "trailing", 4 steps, guidance 0."""
    torch_pipe, folder = tiny_sdxl
    torch_pipe = copy.copy(torch_pipe)
    torch_pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(
        torch_pipe.scheduler.config, timestep_spacing="trailing"
    )
    with torch.no_grad():
        expected = torch_pipe(PROMPTS, num_inference_steps=4, guidance_scale=0.0, latents=_nchw(_noise()),
                              output_type="np").images  # fmt: skip
    pipe = sdjax.from_pretrained(folder)
    images = pipe.generate(PROMPTS, num_inference_steps=4, guidance_scale=0.0, sampler="euler", latents=_noise(),
                           scheduler_config={"timestep_spacing": "trailing"})  # fmt: skip
    assert float(np.abs(images - expected).max()) <= ATOL
    default = pipe.generate(PROMPTS, num_inference_steps=4, guidance_scale=0.0, latents=_noise())
    assert np.abs(default - images).max() > 1e-3  # the folder's config ("leading") is untouched
    assert pipe.schedule.timestep_spacing == "leading"


@pytest.mark.parametrize(
    "config, message",
    [
        ({"timestep_spacin": "trailing"}, r"unknown scheduler config field\(s\) \['timestep_spacin'\]"),
        ({"timestep_spacing": "uniform"}, "unknown timestep_spacing 'uniform'"),
        ({"solver_order": 4}, "solver_order=4, which sdjax's DPMSolverMultistepScheduler sampler does not implement"),
        ({"thresholding": True}, "thresholding=True"),
    ],
)
def test_bad_scheduler_config_is_one_line(tiny_pipe, config, message):
    with pytest.raises(PipelineError, match=message) as error:
        tiny_pipe.generate(PROMPTS, num_inference_steps=2, sampler="dpmpp_2m", scheduler_config=config)
    assert "\n" not in str(error.value)


def test_sample_cli_takes_scheduler_config_flags(tiny_model, tmp_path, capsys):
    import sample

    args = ["--model", str(tiny_model), "--prompt", "a red circle", "--steps", "2", "--sampler", "unipc"]
    args += ["--scheduler-config", "timestep_spacing=trailing", "--scheduler-config", "solver_order=3"]
    assert sample.main([*args, "--out", str(tmp_path)]) == 0
    assert Image.open(tmp_path / "0000.png").text["scheduler_config"] == (
        '{"timestep_spacing": "trailing", "solver_order": 3}'
    )
    bad = ["--model", str(tiny_model), "--prompt", "x", "--scheduler-config", "trailing", "--out", str(tmp_path)]
    assert sample.main(bad) == 2
    assert "--scheduler-config takes KEY=VALUE" in capsys.readouterr().err
