"""The per-evaluation rows every task can read, and the sampling hooks.

The rows' noise levels are diffusers' ``scheduler.add_noise`` scales as its inpainting loop uses them (after
evaluation i: ``add_noise(init, noise, timesteps[i + 1])``, none after the last; the img2img start: at
``timesteps[0]``), for every sampler. A 4-channel inpainting blend written as an ``after_step`` hook on the rows
reproduces diffusers' ``StableDiffusionInpaintPipeline`` (a first- and a second-order sampler, the latter with
Heun's repeated timesteps).
"""

from __future__ import annotations

import copy
import inspect

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from sdjax import denoise, latents, samplers, tasks
from sdjax.schedule import ScheduleConfig
from tests.reference import NEGATIVE, PROMPTS
from tests.sampler_reference import (
    KEY,
    SD15,
    SHAPE,
    diffusers_scheduler,
    sdjax_run,
    start,
    to_numpy,
    to_torch,
    toy_jax,
    toy_torch,
)


def _diffusers_levels(name: str, steps: int, strength: float):
    """The add_noise scales (x0, noise) diffusers' inpainting loop uses: at the start, then after each step."""
    scheduler, timesteps = diffusers_scheduler(name, steps, strength=strength)
    one, zero = torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 1, 1)

    def level(t):
        t = t.reshape(1)
        return float(scheduler.add_noise(one, zero, t)), float(scheduler.add_noise(zero, one, t))

    first = level(timesteps[:1])
    x, after = torch.zeros(1, 4, 2, 2), []
    kwargs = {"eta": 0.0} if "eta" in inspect.signature(scheduler.step).parameters else {}
    for i, t in enumerate(timesteps):
        x = scheduler.step(torch.zeros_like(x), t, x, **kwargs).prev_sample
        after.append(level(timesteps[i + 1]) if i < len(timesteps) - 1 else (1.0, 0.0))
    return first, np.array(after)


@pytest.mark.parametrize("steps, strength", [(7, 1.0), (10, 0.6)])
@pytest.mark.parametrize("name", samplers.SAMPLERS)
def test_rows_give_the_add_noise_levels_of_diffusers_inpainting_loop(name, steps, strength):
    first, after = _diffusers_levels(name, steps, strength)
    plan = samplers.make_plan(ScheduleConfig.from_dict(SD15), name, steps, strength=strength)
    np.testing.assert_allclose((plan.x0_scale[0], plan.noise_scale[0]), first, rtol=1e-5)
    np.testing.assert_allclose(np.stack([plan.next_x0_scale, plan.next_noise_scale], 1), after, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------ hooks


def _blend_hook(mask: np.ndarray, init: np.ndarray, noise: np.ndarray) -> samplers.Hooks:
    """4-channel inpainting as diffusers does it: keep the latents inside the mask, the init latents noised to
    the next evaluation's level outside."""
    mask, init, noise = (jnp.asarray(a, jnp.float32) for a in (mask, init, noise))
    return samplers.Hooks(after_step=lambda x, row: (1 - mask) * row.noised_next(init, noise) + mask * x)


def _diffusers_inpaint_loop(name: str, steps: int, strength: float, mask: np.ndarray):
    """StableDiffusionInpaintPipeline's 4-channel loop (diffusers 0.42, the lines after ``scheduler.step``) on the toy
    model."""
    noise, x0 = (to_torch(a) for a in start())
    scheduler, timesteps = diffusers_scheduler(name, steps, strength=strength)
    init_mask = to_torch(mask)
    if strength == 1.0:
        x = noise * scheduler.init_noise_sigma
    else:
        x = scheduler.add_noise(x0, noise, timesteps[:1])
    for i, t in enumerate(timesteps):
        x = scheduler.step(toy_torch(scheduler.scale_model_input(x, t), t), t, x).prev_sample
        init_latents_proper = x0
        if i < len(timesteps) - 1:
            init_latents_proper = scheduler.add_noise(init_latents_proper, noise, torch.tensor([timesteps[i + 1]]))
        x = (1 - init_mask) * init_latents_proper + init_mask * x
    return to_numpy(x)


MASK = np.broadcast_to((np.arange(8) < 5)[None, :, None, None], SHAPE).astype(np.float32)


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("name", ["euler", "heun", "dpm2", "dpmpp_2m", "unipc", "ddim", "lms"])
def test_an_after_step_blend_reproduces_diffusers_inpainting_loop(name, strength):
    noise, x0 = start()
    ours, _, _ = sdjax_run(name, 12, strength=strength, hooks=(_blend_hook(MASK, x0, noise),))
    ref = _diffusers_inpaint_loop(name, 12, strength, MASK)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)
    np.testing.assert_allclose(ours[MASK == 0], x0[MASK == 0], rtol=0, atol=1e-5)  # no noise after the last step


def test_an_after_step_hook_runs_at_every_evaluation_with_its_row():
    plan = samplers.make_plan(ScheduleConfig(), "heun", 4)
    seen = []

    def after_step(x, row):
        jax.debug.callback(lambda *r: seen.append(tuple(float(v) for v in r)), row.index, row.timestep,
                           row.next_x0_scale, row.next_noise_scale, ordered=True)  # fmt: skip
        return x + 1.0

    plain = samplers.sample(plan, toy_jax, jnp.ones(SHAPE), KEY)
    hooked = samplers.sample(plan, toy_jax, jnp.ones(SHAPE), KEY, hooks=(samplers.Hooks(after_step=after_step),))
    jax.effects_barrier()
    rows = (range(plan.num_evaluations), plan.timesteps, plan.next_x0_scale, plan.next_noise_scale)
    expected = list(zip(*rows, strict=True))
    np.testing.assert_allclose(np.array(seen), np.array(expected, np.float64), rtol=1e-6)
    assert np.abs(np.asarray(hooked) - np.asarray(plain)).min() > 0.5  # the returned latents are the ones used


def test_noising_to_the_next_level_after_the_last_evaluation_leaves_x0():
    plan = samplers.make_plan(ScheduleConfig(), "dpmpp_2m", 5)
    x0, noise = jnp.full(SHAPE, 0.3), jnp.full(SHAPE, 2.0)
    hook = samplers.Hooks(after_step=lambda x, row: row.noised_next(x0, noise))
    out = samplers.sample(plan, toy_jax, jnp.ones(SHAPE), KEY, hooks=(hook,))
    np.testing.assert_allclose(out, x0, rtol=0, atol=1e-7)


def test_before_model_hooks_change_the_model_input_and_add_model_inputs():
    plan = samplers.make_plan(ScheduleConfig(), "euler", 6)
    x = samplers.initial_latents(plan, jnp.asarray(start()[0]))

    def with_channel(x_in, row):  # e.g. 9-channel inpainting: more input channels
        return jnp.concatenate([x_in, jnp.full(x_in.shape[:3] + (1,), 2.0)], -1), {}

    def with_gain(x_in, row):  # e.g. ControlNet: a model input computed from the row
        return x_in, {"gain": 1 + row.timestep / 1000}

    def model(x_in, t, gain):
        return toy_jax(x_in[..., :4], t) * gain + x_in[..., 4:] - 2.0

    hooks = (samplers.Hooks(before_model=with_channel), samplers.Hooks(before_model=with_gain))
    ours = samplers.sample(plan, model, x, KEY, hooks=hooks)
    reference = samplers.sample(plan, lambda x_in, t: toy_jax(x_in, t) * (1 + t / 1000), x, KEY)
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-5)


def test_after_step_hooks_compose_in_order():
    plan = samplers.make_plan(ScheduleConfig(), "ddim", 1)
    zero = lambda x, t: jnp.zeros_like(x)  # noqa: E731
    hooks = (samplers.Hooks(after_step=lambda x, row: x * 0 + 1), samplers.Hooks(after_step=lambda x, row: x * 3))
    np.testing.assert_array_equal(samplers.sample(plan, zero, jnp.ones(SHAPE), KEY, hooks=hooks), 3.0)


def test_two_hooks_giving_the_same_model_input_are_refused():
    plan = samplers.make_plan(ScheduleConfig(), "ddim", 2)
    hook = samplers.Hooks(before_model=lambda x_in, row: (x_in, {"gain": 1.0}))
    with pytest.raises(ValueError, match=r"two sampling hooks give the same model input\(s\) \['gain'\]"):
        samplers.sample(plan, lambda x, t, gain: x, jnp.ones(SHAPE), KEY, hooks=(hook, hook))


# ------------------------------------------------------------------------------------------------ the real pipeline


@pytest.fixture(scope="module")
def inpaint_pipeline(tiny_torch_pipe):
    """diffusers' StableDiffusionInpaintPipeline over the tiny 4-channel model, its VAE encoding reading the
    posterior mean (so that both libraries start from the same init latents)."""
    return diffusers.StableDiffusionInpaintPipeline(**copy.deepcopy(tiny_torch_pipe.components))


@pytest.mark.parametrize("name, strength", [("euler", 1.0), ("heun", 0.75)])
def test_the_blend_hook_reproduces_diffusers_inpaint_pipeline(inpaint_pipeline, tiny_pipe, name, strength, monkeypatch):
    module = inspect.getmodule(type(inpaint_pipeline))
    monkeypatch.setattr(module, "retrieve_latents", lambda output, generator=None: output.latent_dist.mean)
    image = np.random.default_rng(3).uniform(0, 1, (16, 16, 3)).astype(np.float32)  # the tiny VAE downsamples 2x
    mask = np.zeros((16, 16), np.float32)
    mask[:, 6:] = 1.0  # on whole 2x2 blocks: any latent downsampling agrees
    # diffusers starts from a given ``latents`` as pure noise even at strength < 1: draw its noise with a generator
    noise_nchw = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(4))
    noise = noise_nchw.permute(0, 2, 3, 1).numpy()
    pipe = inpaint_pipeline
    pipe.scheduler = getattr(diffusers, samplers.REGISTRY[name].scheduler_class).from_config(pipe.scheduler.config)
    ref = pipe(
        PROMPTS, image=Image.fromarray((image * 255).round().astype(np.uint8)), mask_image=Image.fromarray(
            (mask * 255).astype(np.uint8)), negative_prompt=NEGATIVE, num_inference_steps=8, guidance_scale=7.5,
        strength=strength, generator=torch.Generator().manual_seed(4), output_type="latent",
    ).images  # fmt: skip

    pixels = jnp.asarray(np.round(image * 255) / 255 * 2 - 1)[None].repeat(2, 0)
    init = latents.encode(tiny_pipe.vae, tiny_pipe.params["vae"], pixels)  # the posterior mean
    latent_mask = mask[::2, ::2][None, :, :, None]
    plan = samplers.make_plan(tiny_pipe.schedule, name, 8, strength=strength)
    img2img = (tasks.Img2Img(init_latents=True),) if strength < 1 else ()
    spec = denoise.DenoiseSpec(tiny_pipe.unet, tiny_pipe.vae, plan, guided=True, tasks=img2img, decode=False)
    inputs = {
        "noise": jnp.asarray(noise),
        "keys": jax.random.key_data(denoise.image_keys(0, 2)),
        "tasks": {"img2img": {"init": init}},
        **tiny_pipe._conditions(PROMPTS, NEGATIVE, True),
    }
    scalars = {"guidance": jnp.float32(7.5), "eta": jnp.float32(0.0), "guidance_rescale": jnp.float32(0.0)}
    hooks = (_blend_hook(latent_mask, np.asarray(init), noise),)
    ours = denoise.denoise(spec, tiny_pipe.params, scalars, inputs, hooks=hooks)
    np.testing.assert_allclose(np.asarray(ours), to_numpy(ref), rtol=0, atol=2e-4)
