"""The record that describes one sampler: everything the registry, the planner and the loop need to know."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np

from sdjax.samplers.plan import SamplerPlan
from sdjax.schedule import ScheduleConfig

NOISE_KINDS = ("none", "eta", "always")

# plan(cfg, alphas_cumprod, num_steps, t_start, karras) -> SamplerPlan: cfg already resolved for the class,
# alphas_cumprod float32 numpy (T,), the first ``t_start`` steps skipped (img2img), karras: Karras sigmas on.
PlanFn = Callable[[ScheduleConfig, np.ndarray, int, int, bool], SamplerPlan]
# step(plan, x, state, out, row, noise, eta) -> (x_next, state): ``out`` is the float32 model output at this
# evaluation, ``row`` its :class:`~sdjax.samplers.plan.Row`, ``noise`` the evaluation's
# :class:`~sdjax.samplers.noise.StepNoise` (draws only what the step asks for), ``eta`` the traced eta argument.
StepFn = Callable[..., tuple[jnp.ndarray, Any]]


@dataclasses.dataclass(frozen=True)
class Sampler:
    """One sampler: the diffusers scheduler class it reproduces (whose defaults fill what a scheduler config
    leaves out), its host-side planner, its per-evaluation step and the scan state it carries.

    noise: "none" (deterministic), "always" (fresh noise at every step, e.g. ancestral samplers) or "eta" (noise
    scaled by the ``eta`` argument: deterministic when eta = 0). karras: takes ``use_karras_sigmas``. order: model
    evaluations per step. pinned: scheduler config fields the sampler's name decides (dpmpp_2m_sde runs
    ``algorithm_type="sde-dpmsolver++"`` whatever the config says). finite_sigma_max: the class keeps the
    zero-SNR schedule's last level finite (alphas_cumprod[-1] = 2^-24), as diffusers' sigma schedulers do.
    prediction_types: the model outputs the class implements. max_eta: the largest ``eta`` it takes (TCD's gamma).
    """

    name: str
    scheduler_class: str
    plan: PlanFn
    step: StepFn
    initial_state: Callable[[SamplerPlan, jnp.ndarray], Any]
    noise: str = "none"
    karras: bool = False
    order: int = 1
    pinned: tuple[tuple[str, Any], ...] = ()
    finite_sigma_max: bool = False
    prediction_types: tuple[str, ...] = ("epsilon", "v_prediction", "sample")
    max_eta: float | None = None

    def __post_init__(self):
        if self.noise not in NOISE_KINDS:
            raise ValueError(f"noise must be one of {NOISE_KINDS}, got {self.noise!r}")


def no_state(plan: SamplerPlan, x: jnp.ndarray) -> tuple:
    return ()
