"""Sampler plans on the published scheduler configs: sdjax's timesteps and sigmas equal those of the matching
diffusers scheduler after ``from_config(published_config)`` + ``set_timesteps``, for every sampler (stochastic
ones included), step count and img2img strength, Karras sigmas on and off."""

from __future__ import annotations

import inspect

import diffusers
import numpy as np
import pytest

from sdjax import samplers
from sdjax.schedule import SCHEDULER_DEFAULTS, ScheduleConfig
from tests.published import FIXTURES, published_config

PUBLISHED = sorted(p.name for p in FIXTURES.iterdir() if (p / "scheduler").is_dir())
STEPS = [1, 2, 7, 20, 50]
STRENGTHS = [1.0, 0.75, 0.3]


def _scheduler(sampler: str, config: dict, karras: bool, steps: int):
    record = samplers.REGISTRY[sampler]
    cls = getattr(diffusers, record.scheduler_class)
    scheduler = cls.from_config(config, **({"use_karras_sigmas": True} if karras else {}), **dict(record.pinned))
    scheduler.set_timesteps(steps)
    return scheduler


ORIGINAL = ("ddim", "ddpm", "pndm", "euler", "euler_ancestral", "dpmpp_2m", "heun")
DEFAULT_NEW = ("sd15", "sd21", "sdxl_base")  # the newer samplers' default-suite configs; the rest are slow


def _cases():
    for name in PUBLISHED:
        for sampler, record in samplers.REGISTRY.items():
            marks = [] if sampler in ORIGINAL or name in DEFAULT_NEW else [pytest.mark.slow]
            for karras in (False, True) if record.karras and sampler != "euler_ancestral" else (False,):
                for steps in STEPS:
                    # strength * steps < 1 runs no step (sdjax refuses it; diffusers would run none).
                    for strength in (s for s in STRENGTHS if int(steps * s) >= 1):
                        label = f"{name}-{sampler}{'-karras' if karras else ''}-{steps}-{strength}"
                        yield pytest.param(name, sampler, karras, steps, strength, id=label, marks=marks)


@pytest.mark.parametrize("name, sampler, karras, steps, strength", list(_cases()))
def test_plan_matches_diffusers_scheduler(name, sampler, karras, steps, strength):
    config = published_config(name, "scheduler")
    scheduler = _scheduler(sampler, config, karras, steps)
    plan = samplers.make_plan(
        ScheduleConfig.from_dict(config), sampler, steps, strength=strength, use_karras_sigmas=karras or None
    )
    begin = (steps - int(steps * strength)) * scheduler.order  # StableDiffusionImg2ImgPipeline.get_timesteps
    timesteps = scheduler.timesteps.numpy()[begin:]
    assert plan.num_evaluations == len(timesteps)
    np.testing.assert_allclose(plan.timesteps, timesteps, rtol=0, atol=3e-4)  # a float32 ulp of fractional ones
    if hasattr(scheduler, "sigmas") and plan.x0_scale[0] == 1.0:  # a sigma sampler: its levels are the sigmas
        sigmas = scheduler.sigmas.numpy()
        np.testing.assert_allclose(plan.noise_scale, sigmas[begin : begin + plan.num_evaluations], rtol=1e-6)
    if strength == 1.0:
        np.testing.assert_allclose(plan.init_noise_sigma, float(scheduler.init_noise_sigma), rtol=1e-6)
    if sampler == "ddim":
        ac, ratio = scheduler.alphas_cumprod.numpy(), scheduler.config.num_train_timesteps // steps
        prev = timesteps.astype(np.int64) - ratio
        expected = np.where(prev >= 0, ac[np.maximum(prev, 0)], float(scheduler.final_alpha_cumprod))
        np.testing.assert_allclose(plan.row("alpha_prev"), expected, rtol=1e-6)


@pytest.mark.parametrize("name", [n for n in PUBLISHED if not n.startswith("sdxl")])
def test_published_configs_leave_timestep_spacing_to_the_sampler_class(name):
    """The reason for per-class defaults: the same published SD 1.x / 2.x file spaces euler and ddim differently.
    (SDXL's scheduler config sets timestep_spacing "leading" itself.)"""
    config = published_config(name, "scheduler")
    assert "timestep_spacing" not in config
    euler = samplers.make_plan(ScheduleConfig.from_dict(config), "euler", 10)
    ddim = samplers.make_plan(ScheduleConfig.from_dict(config), "ddim", 10)
    assert euler.timesteps[0] == 999.0 and ddim.timesteps[0] == 901.0


@pytest.mark.parametrize("scheduler_class", sorted(SCHEDULER_DEFAULTS))
def test_scheduler_defaults_are_the_diffusers_class_defaults(scheduler_class):
    """The table sdjax fills unset fields from is the classes' own __init__ defaults (diffusers 0.42)."""
    signature = inspect.signature(getattr(diffusers, scheduler_class).__init__).parameters
    for field, default in SCHEDULER_DEFAULTS[scheduler_class].items():
        expected = signature[field].default
        assert default == (tuple(expected) if isinstance(expected, list) else expected), field
