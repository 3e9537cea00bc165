"""Every sampler by name. A new sampler is one file holding its plan, state and step, and one line here."""

from __future__ import annotations

from sdjax.samplers import (
    ddim,
    ddpm,
    deis,
    dpm2,
    dpm2_ancestral,
    dpmpp_2m,
    dpmpp_2m_sde,
    dpmpp_sde,
    euler,
    euler_ancestral,
    heun,
    lcm,
    lms,
    pndm,
    tcd,
    unipc,
)
from sdjax.samplers.record import Sampler

REGISTRY: dict[str, Sampler] = {
    module.SAMPLER.name: module.SAMPLER
    for module in (
        ddim,
        ddpm,
        pndm,
        euler,
        euler_ancestral,
        dpmpp_2m,
        heun,
        unipc,
        lms,
        deis,
        dpm2,
        dpm2_ancestral,
        dpmpp_sde,
        dpmpp_2m_sde,
        lcm,
        tcd,
    )
}
SAMPLERS: tuple[str, ...] = tuple(REGISTRY)
KARRAS_SAMPLERS: tuple[str, ...] = tuple(name for name, s in REGISTRY.items() if s.karras)


def sampler_for_class(scheduler_class: str, default: str = "ddim", config=None) -> str:
    """The sampler that reproduces a diffusers scheduler class (``EulerDiscreteScheduler`` -> "euler"; a
    ``DPMSolverMultistepScheduler`` whose ``config`` (a ScheduleConfig) sets ``algorithm_type="sde-dpmsolver++"``
    -> "dpmpp_2m_sde"); ``default`` for classes sdjax has no sampler for."""
    for name, record in REGISTRY.items():
        if record.scheduler_class != scheduler_class:
            continue
        pinned = dict(record.pinned).get("algorithm_type")
        if pinned is None or config is None or "algorithm_type" in config.unset or config.algorithm_type == pinned:
            return name
    return default
