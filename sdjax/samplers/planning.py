"""``make_plan``: the host-side bookkeeping every sampler shares (arguments, the class's config, img2img
``strength``, SDXL's ``denoising_start`` / ``denoising_end``); the sampler's own ``plan`` does the rest."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from sdjax import schedule
from sdjax.samplers.plan import SamplerPlan
from sdjax.samplers.record import Sampler
from sdjax.samplers.registry import KARRAS_SAMPLERS, REGISTRY, SAMPLERS
from sdjax.schedule import ScheduleConfig


def make_plan(
    cfg: ScheduleConfig,
    sampler: str,
    num_steps: int,
    *,
    strength: float = 1.0,
    use_karras_sigmas: bool | None = None,
    denoising_start: float | None = None,
    denoising_end: float | None = None,
) -> SamplerPlan:
    """Plans ``num_steps`` steps of ``sampler`` as diffusers would with ``cfg`` (an SD scheduler config).

    The config is first resolved for the sampler's diffusers class (``cfg.for_class``): fields a config file
    left out take that class's defaults, so a published SD 1.5 folder runs euler with "linspace" spacing and
    ddim with "leading", as diffusers does. strength < 1 is img2img: only the last ``int(num_steps * strength)``
    steps run, as diffusers' ``StableDiffusionImg2ImgPipeline.get_timesteps``. ``use_karras_sigmas`` defaults to
    the config's value (for the classes that read it); passing True for a sampler without sigmas is an error.

    ``denoising_start`` / ``denoising_end`` in (0, 1) split one schedule between two models, as diffusers' SDXL
    "ensemble of expert denoisers": the end keeps the evaluations at timesteps >= round(T (1 - end)), the start
    keeps those below round(T (1 - start)) (a second-order sampler never starts between its two evaluations of
    one step), and replaces ``strength``. Raises ValueError (one line) for a bad argument or config value.
    """
    record = _check_arguments(cfg, sampler, num_steps, strength, use_karras_sigmas, denoising_start, denoising_end)
    num_steps = int(num_steps)
    cfg = cfg.for_class(record.scheduler_class, dict(record.pinned))
    if cfg.prediction_type not in record.prediction_types:
        accepted = " or ".join(record.prediction_types)
        raise ValueError(f"{sampler} accepts prediction_type {accepted}, not {cfg.prediction_type!r}")
    karras = cfg.use_karras_sigmas if use_karras_sigmas is None else use_karras_sigmas
    t_start = num_steps - int(num_steps * strength)
    with jax.ensure_compile_time_eval():  # plans are host data, even when made inside a jit trace
        ac = np.asarray(schedule.alphas_cumprod(cfg))
    if record.finite_sigma_max and cfg.rescale_betas_zero_snr:
        ac = ac.copy()
        ac[-1] = 2.0**-24  # as diffusers: keeps sigma_max finite
    if denoising_start is not None:
        t_start = _start_step(record, record.plan(cfg, ac, num_steps, 0, karras), cfg, denoising_start)
    plan = dataclasses.replace(
        record.plan(cfg, ac, num_steps, t_start, karras),
        name=sampler,
        prediction_type=cfg.prediction_type,
        clip_sample_range=cfg.clip_sample_range if cfg.clip_sample else None,
    )
    if denoising_end is not None:
        cutoff = _cutoff(cfg, denoising_end)
        kept = sum(t >= cutoff for t in plan.timesteps)
        if kept == 0:
            raise ValueError(f"denoising_end={denoising_end} leaves no evaluation of {num_steps} {sampler} steps")
        plan = plan.first(kept)
    return plan


def _check_arguments(cfg, sampler, num_steps, strength, use_karras_sigmas, denoising_start, denoising_end) -> Sampler:
    """The sampler's record; ValueError (one line) for a bad argument."""
    if sampler not in REGISTRY:
        raise ValueError(f"unknown sampler {sampler!r}; accepted: {', '.join(SAMPLERS)}")
    record = REGISTRY[sampler]
    max_steps = cfg.num_train_timesteps
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= max_steps:
        raise ValueError(f"num_steps must be an int in [1, {max_steps}] (num_train_timesteps), got {num_steps!r}")
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength!r}")
    if int(num_steps * strength) < 1:
        raise ValueError(f"strength * num_steps must be >= 1 so that a step runs; got {strength} * {num_steps}")
    if use_karras_sigmas and not record.karras:
        raise ValueError(f"Karras sigmas apply only to samplers {', '.join(KARRAS_SAMPLERS)}, not {sampler!r}")
    for name, value in (("denoising_start", denoising_start), ("denoising_end", denoising_end)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1):
            raise ValueError(f"{name} must be a number in (0, 1) (a fraction of the schedule), got {value!r}")
    if denoising_start is not None and denoising_end is not None and denoising_start >= denoising_end:
        raise ValueError(f"denoising_start ({denoising_start}) must be below denoising_end ({denoising_end})")
    return record


def _cutoff(cfg: ScheduleConfig, fraction: float) -> int:
    """The discrete timestep where a fraction of the schedule is done (diffusers' ``discrete_timestep_cutoff``)."""
    return int(round(cfg.num_train_timesteps - fraction * cfg.num_train_timesteps))


def _start_step(record: Sampler, full: SamplerPlan, cfg: ScheduleConfig, denoising_start: float) -> int:
    """The first step run when starting at ``denoising_start`` (diffusers' SDXL img2img ``get_timesteps``)."""
    kept = sum(t < _cutoff(cfg, denoising_start) for t in full.timesteps)
    if record.order == 2 and kept % 2 == 0:
        kept += 1  # start on a predictor evaluation, not between a step's two evaluations
    if kept == 0:
        raise ValueError(f"denoising_start={denoising_start} leaves no evaluation of the {record.name} schedule")
    return (full.num_evaluations - kept) // record.order
