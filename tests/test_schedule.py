"""sdjax.schedule against diffusers' schedulers (the PyTorch reference)."""

import json

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

from sdjax import schedule
from sdjax.samplers.sigmas import karras_sigmas, timesteps_from_sigmas
from sdjax.schedule import ScheduleConfig

# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json, as shipped.
SD15_SCHEDULER_JSON = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
SCHEDULE_VARIANTS = [
    dict(beta_schedule=b, rescale_betas_zero_snr=z)
    for b in ("linear", "scaled_linear", "squaredcos_cap_v2")
    for z in (False, True)
]


def _reference(**kwargs) -> DDPMScheduler:
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, **kwargs)


def _nchw(x) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2)


@pytest.mark.parametrize("variant", SCHEDULE_VARIANTS, ids=lambda v: "-".join(map(str, v.values())))
def test_betas_match_diffusers(variant):
    ours = schedule.betas(ScheduleConfig(**variant))
    assert ours.dtype == jnp.float32
    # diffusers rescales to zero SNR in float32; we do it in float64.
    np.testing.assert_allclose(ours, _reference(**variant).betas.numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", SCHEDULE_VARIANTS, ids=lambda v: "-".join(map(str, v.values())))
def test_alphas_cumprod_match_diffusers(variant):
    ours = schedule.alphas_cumprod(ScheduleConfig(**variant))
    assert ours.dtype == jnp.float32
    np.testing.assert_allclose(ours, _reference(**variant).alphas_cumprod.numpy(), rtol=1e-6, atol=1e-6)


def test_zero_terminal_snr_makes_last_alphas_cumprod_zero():
    ac = schedule.alphas_cumprod(ScheduleConfig(rescale_betas_zero_snr=True))
    assert float(ac[-1]) == 0.0
    assert float(ac[0]) == pytest.approx(float(schedule.alphas_cumprod(ScheduleConfig())[0]), rel=1e-6)


def test_sigmas_from_alphas_cumprod_match_euler_scheduler():
    cfg = ScheduleConfig()
    ref = EulerDiscreteScheduler.from_config(cfg.to_dict()).sigmas.numpy()[:-1][::-1]
    np.testing.assert_allclose(schedule.sigmas_from_alphas_cumprod(schedule.alphas_cumprod(cfg)), ref, rtol=1e-6)


def test_add_noise_matches_diffusers():
    rng = np.random.default_rng(0)
    x0, noise = rng.standard_normal((2, 2, 8, 8, 3)).astype(np.float32)
    t = np.array([3, 987])
    ref = _reference(beta_schedule="scaled_linear").add_noise(_nchw(x0), _nchw(noise), torch.from_numpy(t))
    ours = schedule.add_noise(schedule.alphas_cumprod(ScheduleConfig()), x0, noise, jnp.asarray(t))
    np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), atol=1e-6)


def test_velocity_matches_diffusers():
    rng = np.random.default_rng(1)
    x0, noise = rng.standard_normal((2, 2, 8, 8, 3)).astype(np.float32)
    t = np.array([0, 500])
    ref = _reference(beta_schedule="scaled_linear").get_velocity(_nchw(x0), _nchw(noise), torch.from_numpy(t))
    ours = schedule.velocity(schedule.alphas_cumprod(ScheduleConfig()), x0, noise, jnp.asarray(t))
    np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), atol=1e-6)


def test_snr_is_inverse_squared_sigma():
    ac = schedule.alphas_cumprod(ScheduleConfig())
    t = jnp.array([0, 10, 999])
    np.testing.assert_allclose(schedule.snr(ac, t), schedule.sigmas_from_alphas_cumprod(ac)[t] ** -2, rtol=1e-5)


def test_add_noise_velocity_and_snr_jit_with_traced_timesteps():
    ac = schedule.alphas_cumprod(ScheduleConfig())
    x0, noise = jnp.ones((2, 4, 4, 1)), jnp.full((2, 4, 4, 1), 0.5)
    t = jnp.array([7, 900])
    fns = (schedule.add_noise, schedule.velocity)
    for fn in fns:
        np.testing.assert_allclose(jax.jit(fn)(ac, x0, noise, t), fn(ac, x0, noise, t), rtol=1e-6)
    np.testing.assert_allclose(jax.jit(schedule.snr)(ac, t), schedule.snr(ac, t), rtol=1e-6)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("num_steps", [1, 7, 20, 50, 999])
def test_inference_timesteps_match_ddim_scheduler(spacing, num_steps):
    cfg = ScheduleConfig(timestep_spacing=spacing, steps_offset=0 if num_steps == 999 else 1)
    ref = DDIMScheduler.from_config(cfg.to_dict())
    ref.set_timesteps(num_steps)
    ours = schedule.inference_timesteps(cfg, num_steps)
    assert ours.dtype == np.int64
    np.testing.assert_array_equal(ours, ref.timesteps.numpy())


@pytest.mark.parametrize("num_steps", [0, 1001, 2.5])
def test_inference_timesteps_reject_bad_step_counts(num_steps):
    with pytest.raises(ValueError, match=r"num_steps must be an int in \[1, 1000\]"):
        schedule.inference_timesteps(ScheduleConfig(), num_steps)


def test_inference_timesteps_reject_leading_offset_past_the_schedule():
    with pytest.raises(ValueError, match="timestep 1000 >= num_train_timesteps=1000"):
        schedule.inference_timesteps(ScheduleConfig(steps_offset=1), 1000)


def test_karras_sigmas_match_euler_scheduler():
    cfg = ScheduleConfig(use_karras_sigmas=True)
    ref = EulerDiscreteScheduler.from_config(cfg.to_dict())
    ref.set_timesteps(25)
    sigmas = ref.sigmas.numpy()[:-1].astype(np.float64)
    ours = karras_sigmas(sigmas[-1], sigmas[0], 25)
    np.testing.assert_allclose(ours, sigmas, rtol=1e-6)
    np.testing.assert_allclose(
        timesteps_from_sigmas(ours, np.asarray(schedule.alphas_cumprod(cfg))),
        ref.timesteps.numpy(),
        atol=2e-4,
    )


def test_timesteps_from_sigmas_inverts_the_sigma_table():
    ac = np.asarray(schedule.alphas_cumprod(ScheduleConfig()))
    t = np.array([999, 500, 37, 1])
    sigmas = np.asarray(schedule.sigmas_from_alphas_cumprod(ac))[t]
    np.testing.assert_allclose(timesteps_from_sigmas(sigmas, ac), t, atol=1e-3)


def test_from_dict_reads_sd15_scheduler_config_and_records_what_it_leaves_out():
    cfg = ScheduleConfig.from_dict(SD15_SCHEDULER_JSON)
    assert {"timestep_spacing", "prediction_type", "use_karras_sigmas"} <= cfg.unset
    assert not {"steps_offset", "beta_schedule", "skip_prk_steps"} & cfg.unset
    assert dict(cfg.other) == {"trained_betas": None}  # "_class_name" / "_diffusers_version" are dropped
    assert cfg.to_dict() == {k: v for k, v in SD15_SCHEDULER_JSON.items() if not k.startswith("_")}


@pytest.mark.parametrize(
    "scheduler_class, spacing, offset",
    [
        ("DDIMScheduler", "leading", 1),
        ("EulerDiscreteScheduler", "linspace", 1),
        ("HeunDiscreteScheduler", "linspace", 1),
    ],
)
def test_for_class_fills_unset_fields_with_that_class_defaults(scheduler_class, spacing, offset):
    cfg = ScheduleConfig.from_dict(SD15_SCHEDULER_JSON).for_class(scheduler_class)
    ref = getattr(diffusers, scheduler_class).from_config(SD15_SCHEDULER_JSON).config
    assert (cfg.timestep_spacing, cfg.steps_offset) == (ref.timestep_spacing, ref.steps_offset) == (spacing, offset)
    assert not cfg.unset


def test_for_class_fills_betas_the_file_leaves_out():
    heun = ScheduleConfig.from_dict({}).for_class("HeunDiscreteScheduler")
    ddim = ScheduleConfig.from_dict({}).for_class("DDIMScheduler")
    assert (heun.beta_start, heun.beta_end, heun.beta_schedule) == (0.00085, 0.012, "linear")
    assert (ddim.beta_start, ddim.beta_end, ddim.clip_sample, ddim.set_alpha_to_one) == (0.0001, 0.02, True, True)


def test_for_class_ignores_fields_the_class_does_not_read():
    cfg = ScheduleConfig.from_dict({**SD15_SCHEDULER_JSON, "rescale_betas_zero_snr": True, "clip_sample": True})
    pndm = cfg.for_class("PNDMScheduler")
    assert not pndm.rescale_betas_zero_snr and not pndm.clip_sample
    assert cfg.for_class("DDIMScheduler").rescale_betas_zero_snr


@pytest.mark.parametrize(
    "extra, scheduler_class, message",
    [
        (dict(solver_order=4), "DPMSolverMultistepScheduler", "solver_order=4.*accepted: 1, 2, 3"),
        (dict(algorithm_type="dpmsolver"), "DPMSolverMultistepScheduler", "algorithm_type='dpmsolver'"),
        (dict(solver_type="bh3"), "UniPCMultistepScheduler", "solver_type='bh3'"),
        (dict(predict_x0=False), "UniPCMultistepScheduler", "predict_x0=False"),
        (dict(noise_sampler_seed=3), "DPMSolverSDEScheduler", "noise_sampler_seed=3"),
        (dict(thresholding=True), "LCMScheduler", "thresholding=True"),
        (dict(thresholding=True), "DDIMScheduler", "thresholding=True"),
        (dict(variance_type="learned"), "DDPMScheduler", "variance_type='learned'"),
        (dict(skip_prk_steps=False), "PNDMScheduler", "skip_prk_steps"),
    ],
)
def test_for_class_refuses_what_sdjax_does_not_implement(extra, scheduler_class, message):
    with pytest.raises(ValueError, match=message):
        ScheduleConfig.from_dict({**SD15_SCHEDULER_JSON, **extra}).for_class(scheduler_class)


def test_for_class_accepts_unimplemented_fields_the_class_does_not_read():
    cfg = ScheduleConfig.from_dict({**SD15_SCHEDULER_JSON, "solver_order": 4, "algorithm_type": "dpmsolver"})
    assert cfg.for_class("EulerDiscreteScheduler").timestep_spacing == "linspace"


@pytest.mark.parametrize(
    "scheduler_class, given, ran",
    [
        ("UniPCMultistepScheduler", dict(solver_type="midpoint"), dict(solver_type="bh2")),
        (
            "DEISMultistepScheduler",
            dict(algorithm_type="dpmsolver++", solver_type="midpoint"),
            dict(solver_type="logrho"),
        ),
        ("DPMSolverMultistepScheduler", dict(solver_type="bh2"), dict(solver_type="midpoint")),
    ],
)
def test_for_class_rewrites_values_as_the_class_does(scheduler_class, given, ran):
    """One model's scheduler config drives every sampler: a DPM-Solver solver_type given to UniPC runs bh2."""
    cfg = ScheduleConfig.from_dict({**SD15_SCHEDULER_JSON, **given}).for_class(scheduler_class)
    reference = getattr(diffusers, scheduler_class).from_config({**SD15_SCHEDULER_JSON, **given}).config
    for field, value in ran.items():
        assert getattr(cfg, field) == reference[field] == value


def test_for_class_pins_what_the_sampler_name_decides():
    cfg = ScheduleConfig.from_dict({**SD15_SCHEDULER_JSON, "algorithm_type": "dpmsolver++"})
    pinned = cfg.for_class("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"})
    assert pinned.algorithm_type == "sde-dpmsolver++"


def test_a_config_built_in_code_writes_no_solver_fields_it_leaves_at_their_defaults():
    assert not {"solver_order", "original_inference_steps"} & set(ScheduleConfig().to_dict())
    assert ScheduleConfig(solver_order=3).to_dict()["solver_order"] == 3
    assert ScheduleConfig(solver_order=3).for_class("DPMSolverMultistepScheduler").solver_order == 3


def test_updated_sets_fields_as_if_the_file_had_them():
    cfg = ScheduleConfig.from_dict(SD15_SCHEDULER_JSON).updated({"timestep_spacing": "trailing", "solver_order": 3})
    assert cfg.timestep_spacing == "trailing" and "timestep_spacing" not in cfg.unset
    assert cfg.for_class("EulerDiscreteScheduler").timestep_spacing == "trailing"
    assert cfg.for_class("DPMSolverMultistepScheduler").solver_order == 3
    assert cfg.steps_offset == 1  # the model's fields stay
    whole = {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.30.0", "disable_corrector": [1]}
    assert ScheduleConfig.from_dict(SD15_SCHEDULER_JSON).updated(whole).disable_corrector == (1,)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"timestep_spacin": "trailing"}, r"unknown scheduler config field\(s\) \['timestep_spacin'\]; accepted: "),
        ({"timestep_spacing": "uniform"}, "unknown timestep_spacing 'uniform'; accepted: leading, trailing, linspace"),
        ({"trained_betas": [0.1] * 1000}, "trained_betas"),
        ("trailing", "scheduler_config must be a dict"),
    ],
)
def test_updated_refuses_unknown_fields_and_bad_values_in_one_line(changes, message):
    with pytest.raises(ValueError, match=message) as error:
        ScheduleConfig.from_dict(SD15_SCHEDULER_JSON).updated(changes)
    assert "\n" not in str(error.value)


def test_from_dict_applies_overrides():
    cfg = ScheduleConfig.from_dict(SD15_SCHEDULER_JSON, prediction_type="v_prediction", steps_offset=0)
    assert (cfg.prediction_type, cfg.steps_offset, cfg.beta_schedule) == ("v_prediction", 0, "scaled_linear")


def test_from_dict_rejects_unknown_override():
    with pytest.raises(ValueError, match="unknown ScheduleConfig override.*prediction_typ"):
        ScheduleConfig.from_dict({}, prediction_typ="epsilon")


def test_from_dict_rejects_trained_betas():
    with pytest.raises(ValueError, match="trained_betas"):
        ScheduleConfig.from_dict({**SD15_SCHEDULER_JSON, "trained_betas": [0.1] * 1000})


def test_json_file_round_trip(tmp_path):
    cfg = ScheduleConfig(prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True)
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert ScheduleConfig.from_json_file(path) == cfg


def test_to_dict_builds_the_same_diffusers_schedule():
    cfg = ScheduleConfig(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    ref = DDIMScheduler.from_config(cfg.to_dict())
    np.testing.assert_allclose(schedule.alphas_cumprod(cfg), ref.alphas_cumprod.numpy(), rtol=1e-6)


@pytest.mark.parametrize(
    "field, value, accepted",
    [
        ("beta_schedule", "cosine", "linear, scaled_linear, squaredcos_cap_v2"),
        ("prediction_type", "eps", "epsilon, v_prediction, sample"),
        ("timestep_spacing", "uniform", "leading, trailing, linspace"),
    ],
)
def test_unknown_choice_is_rejected_listing_accepted_values(field, value, accepted):
    with pytest.raises(ValueError, match=f"unknown {field} '{value}'; accepted: {accepted}"):
        ScheduleConfig(**{field: value})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_train_timesteps=1), "num_train_timesteps must be an int >= 2"),
        (dict(beta_start=0.02, beta_end=0.01), "need 0 < beta_start <= beta_end < 1"),
        (dict(steps_offset=-1), "steps_offset must be an int >= 0"),
        (dict(clip_sample_range=0.0), "clip_sample_range must be > 0"),
    ],
)
def test_bad_numbers_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ScheduleConfig(**kwargs)
