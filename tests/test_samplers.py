"""sdjax.samplers against diffusers' schedulers, and against the closed-form Gaussian-data denoiser.

Parity runs drive each diffusers scheduler the way StableDiffusion(Img2Img)Pipeline does (scale_model_input,
step) with a toy "model" written identically in torch and JAX, from the same starting noise.
"""

import functools

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sdjax import samplers, schedule
from sdjax.schedule import ScheduleConfig

SD15 = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "clip_sample": False,
}
SCHEDULERS = {
    "ddim": diffusers.DDIMScheduler,
    "ddpm": diffusers.DDPMScheduler,
    "pndm": diffusers.PNDMScheduler,
    "euler": diffusers.EulerDiscreteScheduler,
    "euler_ancestral": diffusers.EulerAncestralDiscreteScheduler,
    "dpmpp_2m": diffusers.DPMSolverMultistepScheduler,
    "heun": diffusers.HeunDiscreteScheduler,
}
DETERMINISTIC = [
    ("ddim", False),
    ("pndm", False),
    ("euler", False),
    ("euler", True),
    ("dpmpp_2m", False),
    ("dpmpp_2m", True),
    ("heun", False),
    ("heun", True),
]
PARITY_ATOL = 1e-4  # final latents reach |x| ~ 50 with the toy model
SHAPE = (2, 8, 8, 4)


def _ids(case) -> str:
    name, karras = case
    return f"{name}-karras" if karras else name


def toy_torch(x, t):
    return 0.3 * torch.tanh(x) + 0.1 * torch.cos(torch.as_tensor(t, dtype=torch.float32) / 300) * x


def toy_jax(x, t):
    return 0.3 * jnp.tanh(x) + 0.1 * jnp.cos(t / 300) * x


def _start(seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(SHAPE).astype(np.float32), 0.5 * rng.standard_normal(SHAPE).astype(np.float32)


def _to_torch(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous()


def _to_numpy(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).numpy()


def _diffusers_scheduler(name, steps, karras=False, strength=1.0, **config):
    """A diffusers scheduler after set_timesteps (and the img2img slicing), plus the timesteps to run."""
    scheduler = SCHEDULERS[name].from_config({**SD15, **config, "use_karras_sigmas": karras})
    scheduler.set_timesteps(steps)
    t_start = steps - min(int(steps * strength), steps)  # StableDiffusionImg2ImgPipeline.get_timesteps
    timesteps = scheduler.timesteps[t_start * scheduler.order :]
    if strength < 1 and hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    return scheduler, timesteps


def _diffusers_run(name, steps, karras=False, strength=1.0, step_noise=None, eta=0.0, **config):
    """Final latents (NHWC) and the timesteps the toy model saw, looping as the SD pipelines do."""
    noise, x0 = _start()
    scheduler, timesteps = _diffusers_scheduler(name, steps, karras, strength, **config)
    if strength < 1:
        x = scheduler.add_noise(_to_torch(x0), _to_torch(noise), timesteps[:1].repeat(SHAPE[0]))
    else:
        x = _to_torch(noise) * scheduler.init_noise_sigma
    seen = []
    for i, t in enumerate(timesteps):
        seen.append(float(t))
        out = toy_torch(scheduler.scale_model_input(x, t), t)
        kwargs = {}
        if step_noise is not None:
            kwargs = dict(eta=eta, variance_noise=step_noise(i)) if name == "ddim" else {}
            step_noise.current = step_noise(i)  # picked up by the patched randn_tensor
        x = scheduler.step(out, t, x, **kwargs).prev_sample
    return _to_numpy(x), np.array(seen)


def _sdjax_run(name, steps, karras=False, strength=1.0, eta=0.0, **config):
    noise, x0 = _start()
    cfg = ScheduleConfig.from_dict({**SD15, **config})
    plan = samplers.make_plan(cfg, name, steps, strength=strength, use_karras_sigmas=karras)
    seen = []

    def model_fn(x, t):
        jax.debug.callback(seen.append, t, ordered=True)
        return toy_jax(x, t)

    if strength < 1:
        x = samplers.noised_latents(plan, jnp.asarray(x0), jnp.asarray(noise))
    else:
        x = samplers.initial_latents(plan, jnp.asarray(noise))
    out = samplers.sample(plan, model_fn, x, jax.random.key(0), eta=eta)
    out = np.asarray(out)
    jax.effects_barrier()
    return out, np.array(seen, np.float64)


@functools.cache
def _both(name, karras, prediction_type, steps, strength=1.0, spacing="leading"):
    config = dict(prediction_type=prediction_type, timestep_spacing=spacing)
    return (
        _diffusers_run(name, steps, karras, strength, **config),
        _sdjax_run(name, steps, karras, strength, **config),
    )


# ------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("steps", [50, 20, 7])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("case", DETERMINISTIC, ids=_ids)
def test_final_latents_match_diffusers(case, prediction_type, steps):
    (ref, _), (ours, _) = _both(*case, prediction_type, steps)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=PARITY_ATOL)


@pytest.mark.parametrize("steps", [50, 7])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("case", DETERMINISTIC, ids=_ids)
def test_model_sees_diffusers_timesteps(case, prediction_type, steps):
    (_, ref_t), (_, our_t) = _both(*case, prediction_type, steps)
    assert len(our_t) == len(ref_t)
    np.testing.assert_allclose(our_t, ref_t, rtol=0, atol=1e-3)  # Karras timesteps are fractional


@pytest.mark.parametrize("case", DETERMINISTIC, ids=_ids)
def test_img2img_matches_diffusers(case):
    (ref, ref_t), (ours, our_t) = _both(*case, "epsilon", 20, strength=0.6)
    np.testing.assert_allclose(our_t, ref_t, rtol=0, atol=1e-3)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=PARITY_ATOL)


@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
@pytest.mark.parametrize("name", ["ddim", "pndm", "euler", "dpmpp_2m", "heun"])
def test_other_timestep_spacings_match_diffusers(name, spacing):
    (ref, ref_t), (ours, our_t) = _both(name, False, "epsilon", 10, spacing=spacing)
    np.testing.assert_allclose(our_t, ref_t, rtol=0, atol=1e-3)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=PARITY_ATOL)


@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp_2m", "heun"])
def test_sample_prediction_matches_diffusers(name):
    (ref, _), (ours, _) = _both(name, False, "sample", 20)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=PARITY_ATOL)


@pytest.mark.parametrize("name, eta", [("ddim", 0.7), ("ddpm", 0.0), ("euler_ancestral", 0.0)])
def test_stochastic_samplers_match_diffusers_given_the_same_noise(name, eta, monkeypatch):
    rng = jax.random.key(0)

    def step_noise(i):  # sample() draws evaluation i's noise from fold_in(rng, i)
        return _to_torch(np.asarray(jax.random.normal(jax.random.fold_in(rng, i), SHAPE, jnp.float32)))

    module = SCHEDULERS[name].__module__
    monkeypatch.setattr(f"{module}.randn_tensor", lambda *a, **k: step_noise.current)
    ref, _ = _diffusers_run(name, 20, step_noise=step_noise, eta=eta)
    ours, _ = _sdjax_run(name, 20, eta=eta)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=PARITY_ATOL)


def test_ddim_literal_and_traced_zero_eta_agree():
    plan = samplers.make_plan(ScheduleConfig(), "ddim", 10)
    x = jnp.asarray(_start()[0])
    literal = samplers.sample(plan, toy_jax, x, jax.random.key(0), eta=0.0)
    traced = jax.jit(lambda eta: samplers.sample(plan, toy_jax, x, jax.random.key(0), eta=eta))(0.0)
    np.testing.assert_allclose(literal, traced, rtol=0, atol=1e-5)  # XLA may fuse the two differently


# ------------------------------------------------------------------------------------------------ plans


@pytest.mark.parametrize("name", samplers.SAMPLERS)
def test_initial_latents_use_diffusers_init_noise_sigma(name):
    scheduler, _ = _diffusers_scheduler(name, 30)
    noise = _start()[0]
    ours = samplers.initial_latents(samplers.make_plan(ScheduleConfig(), name, 30), jnp.asarray(noise))
    np.testing.assert_allclose(ours, noise * float(scheduler.init_noise_sigma), rtol=1e-6)


@pytest.mark.parametrize("name", samplers.SAMPLERS)
def test_noised_latents_match_diffusers_add_noise(name):
    scheduler, timesteps = _diffusers_scheduler(name, 30, strength=0.6)
    noise, x0 = _start()
    ref = scheduler.add_noise(_to_torch(x0), _to_torch(noise), timesteps[:1].repeat(SHAPE[0]))
    plan = samplers.make_plan(ScheduleConfig(), name, 30, strength=0.6)
    ours = samplers.noised_latents(plan, jnp.asarray(x0), jnp.asarray(noise))
    np.testing.assert_allclose(ours, _to_numpy(ref), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", samplers.SAMPLERS)
def test_plan_evaluates_the_model_as_often_as_diffusers(name):
    for steps, strength in [(50, 1.0), (7, 1.0), (20, 0.6)]:
        _, timesteps = _diffusers_scheduler(name, steps, strength=strength)
        plan = samplers.make_plan(ScheduleConfig(), name, steps, strength=strength)
        assert plan.num_evaluations == len(timesteps), (steps, strength)


def test_pndm_evaluates_the_model_num_steps_plus_one_times():
    assert samplers.make_plan(ScheduleConfig(), "pndm", 50).num_evaluations == 51


def test_plans_built_alike_are_equal_and_hashable():
    a = samplers.make_plan(ScheduleConfig(), "dpmpp_2m", 25, use_karras_sigmas=True)
    b = samplers.make_plan(ScheduleConfig(), "dpmpp_2m", 25, use_karras_sigmas=True)
    assert a == b and hash(a) == hash(b)
    assert a != samplers.make_plan(ScheduleConfig(), "dpmpp_2m", 25)


def test_config_karras_flag_is_ignored_by_samplers_without_sigmas():
    cfg = ScheduleConfig(use_karras_sigmas=True)
    assert samplers.make_plan(cfg, "ddim", 10) == samplers.make_plan(ScheduleConfig(), "ddim", 10)
    assert samplers.make_plan(cfg, "euler", 10) != samplers.make_plan(ScheduleConfig(), "euler", 10)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sampler="lms"), "unknown sampler 'lms'; accepted: ddim, ddpm, pndm, euler, euler_ancestral"),
        (dict(num_steps=0), r"num_steps must be an int in \[1, 1000\] \(num_train_timesteps\), got 0"),
        (dict(num_steps=1001), r"num_steps must be an int in \[1, 1000\]"),
        (dict(num_steps=2.0), r"num_steps must be an int in \[1, 1000\].*got 2.0"),
        (dict(strength=0.0), r"strength must be in \(0, 1\], got 0.0"),
        (dict(strength=1.5), r"strength must be in \(0, 1\], got 1.5"),
        (dict(strength=0.05), "strength \\* num_steps must be >= 1"),
        (dict(sampler="ddim", use_karras_sigmas=True), "Karras sigmas apply only to samplers euler, euler_ancestral"),
    ],
)
def test_make_plan_rejects_bad_arguments(kwargs, message):
    args = dict(sampler="euler", num_steps=10) | kwargs
    with pytest.raises(ValueError, match=message):
        samplers.make_plan(ScheduleConfig(), args.pop("sampler"), args.pop("num_steps"), **args)


def test_pndm_rejects_sample_prediction():
    with pytest.raises(ValueError, match="pndm accepts prediction_type epsilon or v_prediction"):
        samplers.make_plan(ScheduleConfig(prediction_type="sample"), "pndm", 10)


# ------------------------------------------------------------------------------------------------ loop


def test_changing_eta_and_guidance_scale_does_not_retrace():
    plan = samplers.make_plan(ScheduleConfig(), "ddim", 10)
    traces = []

    @jax.jit
    def run(x, rng, eta, scale):
        traces.append(1)
        return samplers.sample(plan, lambda x, t: scale * toy_jax(x, t), x, rng, eta=eta)

    x, key = jnp.asarray(_start()[0]), jax.random.key(0)
    outs = [np.asarray(run(x, key, eta, scale)) for eta, scale in [(0.0, 1.0), (1.0, 1.0), (1.0, 7.5)]]
    assert len(traces) == 1
    assert np.abs(outs[0] - outs[1]).max() > 1e-2 and np.abs(outs[1] - outs[2]).max() > 1e-2


def test_per_example_keys_make_each_example_independent_of_its_batch():
    plan = samplers.make_plan(ScheduleConfig(), "euler_ancestral", 3)
    run = jax.jit(lambda keys: samplers.sample(plan, toy_jax, jnp.ones(SHAPE), keys))
    k0, k1, k2 = jax.random.split(jax.random.key(0), 3)
    a, b = np.asarray(run(jnp.stack([k0, k1]))), np.asarray(run(jnp.stack([k0, k2])))
    np.testing.assert_array_equal(a[0], b[0])
    assert np.abs(a[1] - b[1]).max() > 1e-2


@pytest.mark.parametrize("name", ["heun", "dpmpp_2m", "pndm", "euler_ancestral"])
def test_one_row_at_a_time_is_the_whole_scan(name):
    # What a progress bar runs (sdjax.denoise.SteppedDenoise): the loop one evaluation at a time, state carried.
    plan = samplers.make_plan(ScheduleConfig(), name, 5)
    x, rng = jnp.ones(SHAPE), jax.random.key(0)
    whole = samplers.sample(plan, toy_jax, x, rng)
    rows, carry = samplers.plan_rows(plan), samplers.initial_carry(plan, x)
    step = jax.jit(lambda carry, row: samplers.sample_steps(plan, toy_jax, carry, row, rng))
    for i in range(plan.num_evaluations):
        carry = step(carry, jax.tree.map(lambda r: r[i : i + 1], rows))  # noqa: B023 - used at once
    np.testing.assert_allclose(carry[0], whole, rtol=0, atol=1e-6)


def test_sampler_state_stays_float32_with_a_bfloat16_model():
    plan = samplers.make_plan(ScheduleConfig(), "dpmpp_2m", 5)
    out = samplers.sample(
        plan, lambda x, t: toy_jax(x.astype(jnp.bfloat16), t), jnp.ones(SHAPE, jnp.bfloat16), jax.random.key(0)
    )
    assert out.dtype == jnp.float32


# ------------------------------------------------------------------------------------------------ statistics
# Data x0 ~ N(MU, S^2) elementwise has the exact denoiser E[eps | x_t] = sqrt(1-a)(x_t - sqrt(a) MU) / (a S^2 + 1 - a)
# With it every sampler should turn N(0, 1) noise into (nearly) N(MU, S^2) samples.

MU, S = 0.5, 0.3
STATS_SHAPE = (2048, 8, 8, 1)
MEAN_TOL, VAR_TOL = 0.004, 0.0075  # measured worst: 0.0017 and 0.0057 (discretization bias of DDPM at 500 steps)


def _oracle(cfg: ScheduleConfig):
    """The Bayes-optimal model for Gaussian data; fractional (Karras) timesteps use log-sigma interpolation."""
    log_sigmas = jnp.log(schedule.sigmas_from_alphas_cumprod(schedule.alphas_cumprod(cfg)))
    grid = jnp.arange(cfg.num_train_timesteps, dtype=jnp.float32)

    def model_fn(x, t):
        a = 1 / (1 + jnp.exp(2 * jnp.interp(t, grid, log_sigmas)))
        eps = jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * MU) / (a * S**2 + 1 - a)
        x0 = (x - jnp.sqrt(1 - a) * eps) / jnp.sqrt(a)
        return {"epsilon": eps, "v_prediction": jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0, "sample": x0}[
            cfg.prediction_type
        ]

    return model_fn


def _expected_moments(plan: samplers.SamplerPlan, cfg: ScheduleConfig, stochastic: bool):
    """Mean and variance the exact sampler would give from this plan's start and end noise levels.

    ddim/pndm stop at alphas_cumprod[0] (set_alpha_to_one=False), the others at the data. A deterministic
    sampler also carries over that x_T ~ N(0, 1) misses the data mean sqrt(a_T) MU at its first level a_T
    (the leading-spacing flaw of Lin et al. 2023).
    """
    a_end = float(schedule.alphas_cumprod(cfg)[0]) if plan.name in ("ddim", "pndm") else 1.0
    mean, var = np.sqrt(a_end) * MU, a_end * S**2 + 1 - a_end
    if stochastic:
        return mean, var
    a_start = plan.alphas_t[0] if plan.alphas_t else 1 / (1 + plan.sigmas[0] ** 2)
    std_start = np.sqrt(a_start * S**2 + 1 - a_start)
    return mean - np.sqrt(var) * np.sqrt(a_start) * MU / std_start, var / std_start**2


@pytest.mark.parametrize(
    "name, karras, eta, prediction_type",
    [
        ("ddim", False, 0.0, "epsilon"),
        ("ddim", False, 1.0, "epsilon"),
        ("ddpm", False, 0.0, "epsilon"),
        ("pndm", False, 0.0, "epsilon"),
        ("euler", False, 0.0, "epsilon"),
        ("euler", True, 0.0, "epsilon"),
        ("euler_ancestral", False, 0.0, "epsilon"),
        ("euler_ancestral", True, 0.0, "epsilon"),
        ("dpmpp_2m", False, 0.0, "epsilon"),
        ("dpmpp_2m", True, 0.0, "epsilon"),
        ("heun", False, 0.0, "epsilon"),
        ("heun", True, 0.0, "epsilon"),
        ("ddpm", False, 0.0, "v_prediction"),
        ("pndm", False, 0.0, "v_prediction"),
    ],
)
def test_samplers_reproduce_gaussian_data_moments(name, karras, eta, prediction_type):
    # Other prediction types go through the same conversions, checked against diffusers above.
    cfg = ScheduleConfig(prediction_type=prediction_type)
    stochastic = name in ("ddpm", "euler_ancestral") or eta > 0
    plan = samplers.make_plan(cfg, name, 500 if stochastic else 250, use_karras_sigmas=karras)
    noise = jax.random.normal(jax.random.key(1), STATS_SHAPE)
    x = samplers.sample(plan, _oracle(cfg), samplers.initial_latents(plan, noise), jax.random.key(2), eta=eta)
    x = np.asarray(x, np.float64)
    mean, var = _expected_moments(plan, cfg, stochastic)
    assert abs(x.mean() - mean) < MEAN_TOL
    assert abs(x.var() - var) < VAR_TOL
