"""sdjax.samplers against diffusers' schedulers on a toy model (``tests/sampler_reference.py``): the final latents
and the timesteps the model sees, for every sampler and solver option, txt2img and img2img, and the loop's
contracts (no retrace on eta, per-example keys, progress, float32 state)."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax import samplers
from sdjax.schedule import ScheduleConfig
from tests.sampler_reference import (
    SHAPE,
    diffusers_run,
    diffusers_scheduler,
    sdjax_run,
    start,
    to_numpy,
    to_torch,
    toy_jax,
)


class Case(NamedTuple):
    """A deterministic sampler setting: name, Karras sigmas, scheduler config fields."""

    name: str
    karras: bool = False
    config: tuple[tuple[str, object], ...] = ()

    @property
    def id(self) -> str:
        extra = "".join(f"-{k}={v}" for k, v in self.config)
        return f"{self.name}{'-karras' if self.karras else ''}{extra}"


ORIGINAL = [  # the first seven samplers' deterministic ones (each case also runs 50 steps in the default suite)
    Case("ddim"),
    Case("pndm"),
    Case("euler"),
    Case("euler", True),
    Case("dpmpp_2m"),
    Case("dpmpp_2m", True),
    Case("heun"),
    Case("heun", True),
]
NEW = [
    Case("unipc"),
    Case("unipc", True),
    Case("lms"),
    Case("lms", True),
    Case("deis"),
    Case("deis", True),
    Case("dpm2"),
    Case("dpm2", True),
    Case("dpmpp_2m", False, (("solver_order", 3),)),
    Case("dpmpp_2m", True, (("solver_order", 3),)),
]
DETERMINISTIC = ORIGINAL + NEW
PARITY_ATOL = 1e-4  # final latents reach |x| ~ 60 with the toy model; measured <= 9e-5


@functools.cache
def _both(case: Case, prediction_type: str, steps: int, strength: float = 1.0, spacing: str = "leading"):
    """((diffusers latents, timesteps), (sdjax latents, timesteps)) of one setting."""
    config = dict(case.config, prediction_type=prediction_type, timestep_spacing=spacing)
    ours, seen, _ = sdjax_run(case.name, steps, case.karras, strength, **config)
    return diffusers_run(case.name, steps, case.karras, strength, **config), (ours, seen)


def _steps():
    for steps in (50, 20, 7):
        yield from (pytest.param(case, steps, id=f"{case.id}-{steps}") for case in ORIGINAL)
        marks = [pytest.mark.slow] if steps == 50 else []
        yield from (pytest.param(case, steps, id=f"{case.id}-{steps}", marks=marks) for case in NEW)


# ------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("case, steps", list(_steps()))
def test_final_latents_match_diffusers(case, steps, prediction_type):
    (ref, _), (ours, _) = _both(case, prediction_type, steps)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=PARITY_ATOL)


@pytest.mark.parametrize("steps", [50, 7])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("case", DETERMINISTIC, ids=lambda c: c.id)
def test_model_sees_diffusers_timesteps(case, prediction_type, steps):
    if steps == 50 and case in NEW:
        pytest.skip("the 50-step runs of the new samplers are in the slow set")
    (_, ref_t), (_, our_t) = _both(case, prediction_type, steps)
    assert len(our_t) == len(ref_t)
    np.testing.assert_allclose(our_t, ref_t, rtol=0, atol=1e-3)  # Karras timesteps are fractional


@pytest.mark.parametrize("case", DETERMINISTIC, ids=lambda c: c.id)
def test_img2img_matches_diffusers(case):
    (ref, ref_t), (ours, our_t) = _both(case, "epsilon", 20, strength=0.6)
    np.testing.assert_allclose(our_t, ref_t, rtol=0, atol=1e-3)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=PARITY_ATOL)


@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
@pytest.mark.parametrize("name", ["ddim", "pndm", "euler", "dpmpp_2m", "heun", "unipc", "lms", "deis", "dpm2", "tcd"])
def test_other_timestep_spacings_match_diffusers(name, spacing):  # the stochastic ones': test_plans.py
    (ref, ref_t), (ours, our_t) = _both(Case(name), "epsilon", 10, spacing=spacing)
    np.testing.assert_allclose(our_t, ref_t, rtol=0, atol=1e-3)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=PARITY_ATOL)


@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp_2m", "heun", "unipc", "lms", "deis", "tcd"])
def test_sample_prediction_matches_diffusers(name):
    (ref, _), (ours, _) = _both(Case(name), "sample", 20)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=PARITY_ATOL)


SOLVER_OPTIONS = [
    Case("unipc", False, (("solver_order", 3),)),
    Case("unipc", True, (("solver_order", 1),)),
    Case("unipc", False, (("solver_type", "bh1"), ("final_sigmas_type", "sigma_min"))),
    Case("unipc", True, (("disable_corrector", (0, 3)),)),
    Case("unipc", False, (("solver_order", 3), ("lower_order_final", False), ("final_sigmas_type", "sigma_min"))),
    Case("deis", False, (("solver_order", 3),)),
    Case("deis", True, (("solver_order", 1),)),
    Case("dpmpp_2m", False, (("solver_type", "heun"),)),
    Case("dpmpp_2m", False, (("solver_order", 3), ("final_sigmas_type", "sigma_min"))),
    Case("dpmpp_2m", False, (("solver_order", 3), ("euler_at_final", True), ("lower_order_final", False))),
    Case("tcd"),  # gamma = eta = 0: deterministic
    Case("lcm"),  # one step: no noise
]


@pytest.mark.parametrize("steps, strength", [(12, 1.0), (4, 1.0), (20, 0.6)])
@pytest.mark.parametrize("case", SOLVER_OPTIONS, ids=lambda c: c.id)
def test_solver_options_match_diffusers(case, steps, strength):
    if case.name == "lcm" and (steps, strength) != (4, 1.0):
        pytest.skip("lcm is deterministic only for one step")
    steps = 1 if case.name == "lcm" else steps
    (ref, ref_t), (ours, our_t) = _both(case, "epsilon", steps, strength)
    np.testing.assert_allclose(our_t, ref_t, rtol=0, atol=1e-3)
    assert np.isfinite(ref).all()
    np.testing.assert_allclose(ours, ref, rtol=0, atol=PARITY_ATOL)


def test_unipc_bh1_to_sigma_zero_is_finite_where_diffusers_is_not():
    """diffusers' last UniPC bh1 step multiplies B(h) = -inf by 0 (NaN); sdjax takes the limit, x0."""
    ours, _, _ = sdjax_run("unipc", 6, solver_type="bh1")
    ref, _ = diffusers_run("unipc", 6, solver_type="bh1")
    assert np.isnan(ref).all() and np.isfinite(ours).all()


# ------------------------------------------------------------------------------------------------ noise


@pytest.mark.parametrize(
    "name, eta, config, steps",
    [
        ("ddim", 0.7, {}, 20),
        ("ddpm", 0.0, {}, 20),
        ("euler_ancestral", 0.0, {}, 20),
        ("dpm2_ancestral", 0.0, {}, 12),
        ("dpm2_ancestral", 0.0, {"prediction_type": "v_prediction"}, 12),
        ("dpmpp_2m_sde", 0.0, {}, 12),
        ("dpmpp_2m_sde", 0.0, {"solver_order": 3, "prediction_type": "v_prediction"}, 12),
        ("dpmpp_2m_sde", 0.0, {"solver_type": "heun"}, 12),
        ("dpmpp_sde", 0.0, {}, 12),
        ("dpmpp_sde", 0.0, {"prediction_type": "v_prediction"}, 12),
        ("lcm", 0.0, {}, 4),
        ("lcm", 0.0, {"prediction_type": "v_prediction"}, 8),
        ("tcd", 0.3, {}, 4),
        ("tcd", 1.0, {}, 8),
    ],
)
def test_stochastic_samplers_match_diffusers_given_the_same_noise(name, eta, config, steps):
    """diffusers' Gaussian draws (and DPM-Solver-SDE's Brownian increments) replaced by sdjax's."""
    ours, _, plan = sdjax_run(name, steps, eta=eta, **config)
    ref, _ = diffusers_run(name, steps, eta=eta, plan=plan, **config)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=PARITY_ATOL)


def test_ddim_literal_and_traced_zero_eta_agree():
    plan = samplers.make_plan(ScheduleConfig(), "ddim", 10)
    x = jnp.asarray(start()[0])
    literal = samplers.sample(plan, toy_jax, x, jax.random.key(0), eta=0.0)
    traced = jax.jit(lambda eta: samplers.sample(plan, toy_jax, x, jax.random.key(0), eta=eta))(0.0)
    np.testing.assert_allclose(literal, traced, rtol=0, atol=1e-5)  # XLA may fuse the two differently


# ------------------------------------------------------------------------------------------------ plans


@pytest.mark.parametrize("name", samplers.SAMPLERS)
def test_initial_latents_use_diffusers_init_noise_sigma(name):
    scheduler, _ = diffusers_scheduler(name, 30)
    noise = start()[0]
    ours = samplers.initial_latents(samplers.make_plan(ScheduleConfig(), name, 30), jnp.asarray(noise))
    np.testing.assert_allclose(ours, noise * float(scheduler.init_noise_sigma), rtol=1e-6)


@pytest.mark.parametrize("name", samplers.SAMPLERS)
def test_noised_latents_match_diffusers_add_noise(name):
    scheduler, timesteps = diffusers_scheduler(name, 30, strength=0.6)
    noise, x0 = start()
    ref = scheduler.add_noise(to_torch(x0), to_torch(noise), timesteps[:1].repeat(SHAPE[0]))
    plan = samplers.make_plan(ScheduleConfig(), name, 30, strength=0.6)
    ours = samplers.noised_latents(plan, jnp.asarray(x0), jnp.asarray(noise))
    np.testing.assert_allclose(ours, to_numpy(ref), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", samplers.SAMPLERS)
def test_plan_evaluates_the_model_as_often_as_diffusers(name):
    for steps, strength in [(50, 1.0), (7, 1.0), (20, 0.6)]:
        _, timesteps = diffusers_scheduler(name, steps, strength=strength)
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
        (dict(sampler="k_lms"), "unknown sampler 'k_lms'; accepted: ddim, ddpm, pndm, euler, euler_ancestral"),
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


@pytest.mark.parametrize("name", ["pndm", "dpm2", "dpm2_ancestral", "dpmpp_sde"])
def test_samplers_whose_class_has_no_sample_prediction_refuse_it(name):
    with pytest.raises(ValueError, match=f"{name} accepts prediction_type epsilon or v_prediction, not 'sample'"):
        samplers.make_plan(ScheduleConfig(prediction_type="sample"), name, 10)


def test_the_sampler_for_a_folder_follows_its_class_and_algorithm():
    assert samplers.sampler_for_class("EulerDiscreteScheduler") == "euler"
    assert samplers.sampler_for_class("UniPCMultistepScheduler") == "unipc"
    sde = ScheduleConfig.from_dict({"algorithm_type": "sde-dpmsolver++"})
    assert samplers.sampler_for_class("DPMSolverMultistepScheduler", "euler", sde) == "dpmpp_2m_sde"
    assert (
        samplers.sampler_for_class("DPMSolverMultistepScheduler", "euler", ScheduleConfig.from_dict({})) == "dpmpp_2m"
    )
    assert samplers.sampler_for_class("FlowMatchEulerDiscreteScheduler", "euler") == "euler"


def test_consistency_samplers_refuse_more_steps_than_their_schedule():
    with pytest.raises(ValueError, match="51 steps exceed the consistency schedule's original_inference_steps"):
        samplers.make_plan(ScheduleConfig(), "lcm", 51)


# ------------------------------------------------------------------------------------------------ loop


def test_changing_eta_and_guidance_scale_does_not_retrace():
    plan = samplers.make_plan(ScheduleConfig(), "ddim", 10)
    traces = []

    @jax.jit
    def run(x, rng, eta, scale):
        traces.append(1)
        return samplers.sample(plan, lambda x, t: scale * toy_jax(x, t), x, rng, eta=eta)

    x, key = jnp.asarray(start()[0]), jax.random.key(0)
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


@pytest.mark.parametrize("name", ["heun", "dpmpp_2m", "pndm", "euler_ancestral", "unipc", "dpmpp_sde", "lcm"])
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
