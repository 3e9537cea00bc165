"""A sampling run planned on the host: one row of numbers per model evaluation, the same fields for every sampler.

Every row says what any task needs, whatever the sampler: the timestep the model is given, the input scaling
c_in, and the noise level of the latents now and at the next evaluation, written as the scales of diffusers'
``scheduler.add_noise`` for the sampler's class::

    add_noise(x0, noise) = x0_scale * x0 + noise_scale * noise

(sqrt(alphas_cumprod), sqrt(1 - alphas_cumprod) for the VP samplers; 1, sigma for the sigma samplers). "Now" is
``add_noise`` at this evaluation (row 0: the img2img start), "next" is ``add_noise`` at the next evaluation's
timestep, and (1, 0) after the last evaluation: exactly the level diffusers' 4-channel inpainting loop noises its
init latents to after evaluation i (``add_noise(init, noise, timesteps[i + 1])``, none after the last). For the
second-order samplers whose second evaluation runs at an interpolated level (dpm2, dpm2_ancestral, dpmpp_sde),
diffusers' ``add_noise`` uses the step's levels, not the interpolated one, and so do the rows.

Each sampler adds its own per-row numbers (``coefficients``: sigmas, solver weights...) and per-run ``constants``.
A plan is frozen and hashable: it is part of the compiled program's key.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def floats(values) -> tuple[float, ...]:
    """A row of the plan: float32-rounded Python floats."""
    return tuple(float(v) for v in np.asarray(values, np.float32).reshape(-1))


@dataclasses.dataclass(frozen=True)
class SamplerPlan:
    """Static description of one sampling run: E model evaluations, one entry per evaluation in each row.

    timesteps: what the model is given; c_in: the factor the latents are scaled by before the model (diffusers'
    ``scale_model_input``); x0_scale, noise_scale: the latents' level at each evaluation as ``add_noise`` scales
    (see the module docstring; ``next_*`` are derived). coefficients: the sampler's own rows, by name;
    constants: its per-run settings. init_noise_sigma: the std of txt2img start latents.
    """

    name: str
    prediction_type: str
    timesteps: tuple[float, ...]
    c_in: tuple[float, ...]
    x0_scale: tuple[float, ...]
    noise_scale: tuple[float, ...]
    coefficients: tuple[tuple[str, tuple[float, ...]], ...] = ()
    constants: tuple[tuple[str, Any], ...] = ()
    init_noise_sigma: float = 1.0
    clip_sample_range: float | None = None

    @property
    def num_evaluations(self) -> int:
        return len(self.timesteps)

    @property
    def next_x0_scale(self) -> tuple[float, ...]:
        return self.x0_scale[1:] + (1.0,)

    @property
    def next_noise_scale(self) -> tuple[float, ...]:
        return self.noise_scale[1:] + (0.0,)

    def row(self, name: str) -> tuple[float, ...]:
        """The sampler's own row ``name`` (E floats)."""
        return dict(self.coefficients)[name]

    def constant(self, name: str, default: Any = None) -> Any:
        return dict(self.constants).get(name, default)

    def first(self, n: int) -> SamplerPlan:
        """The plan cut after its first ``n`` evaluations (SDXL's ``denoising_end``)."""
        cut = {f: getattr(self, f)[:n] for f in ("timesteps", "c_in", "x0_scale", "noise_scale")}
        coefficients = tuple((k, v[:n]) for k, v in self.coefficients)
        return dataclasses.replace(self, **cut, coefficients=coefficients)


def build(
    timesteps,
    c_in,
    x0_scale,
    noise_scale,
    coefficients: dict[str, Any] | None = None,
    constants: dict[str, Any] | None = None,
    init_noise_sigma: float = 1.0,
) -> SamplerPlan:
    """A plan from host arrays (E entries each; ``c_in`` may be a scalar). ``name`` and ``prediction_type`` are
    filled in by :func:`sdjax.samplers.make_plan`."""
    n = len(np.atleast_1d(timesteps))
    rows = {k: floats(np.broadcast_to(np.asarray(v, np.float64), (n,))) for k, v in (coefficients or {}).items()}
    return SamplerPlan(
        name="",
        prediction_type="",
        timesteps=floats(timesteps),
        c_in=floats(np.broadcast_to(np.asarray(c_in, np.float64), (n,))),
        x0_scale=floats(x0_scale),
        noise_scale=floats(noise_scale),
        coefficients=tuple(sorted(rows.items())),
        constants=tuple(sorted((constants or {}).items())),
        init_noise_sigma=float(init_noise_sigma),
    )


def vp_levels(alphas_cumprod) -> tuple[np.ndarray, np.ndarray]:
    """``add_noise`` scales of the VP samplers at alphas_cumprod levels: (sqrt(a), sqrt(1 - a))."""
    a = np.asarray(alphas_cumprod, np.float64)
    return np.sqrt(a), np.sqrt(1 - a)


def ve_levels(sigmas) -> tuple[np.ndarray, np.ndarray]:
    """``add_noise`` scales of the sigma samplers: (1, sigma)."""
    sigmas = np.asarray(sigmas, np.float64)
    return np.ones_like(sigmas), sigmas


class Row(NamedTuple):
    """One evaluation's row inside the scan (float32 scalars; ``index`` int32): what the step, the model and a
    task's hooks read. ``coef`` holds the sampler's own rows by name."""

    index: jnp.ndarray
    timestep: jnp.ndarray
    c_in: jnp.ndarray
    x0_scale: jnp.ndarray
    noise_scale: jnp.ndarray
    next_x0_scale: jnp.ndarray
    next_noise_scale: jnp.ndarray
    coef: dict[str, jnp.ndarray]

    def noised(self, x0: jnp.ndarray, noise: jnp.ndarray) -> jnp.ndarray:
        """``x0`` noised to this evaluation's level, as diffusers' ``add_noise`` at its timestep."""
        return self.x0_scale * x0 + self.noise_scale * noise

    def noised_next(self, x0: jnp.ndarray, noise: jnp.ndarray) -> jnp.ndarray:
        """``x0`` noised to the next evaluation's level (``x0`` itself after the last evaluation)."""
        return self.next_x0_scale * x0 + self.next_noise_scale * noise


# A progress-bar run passes rows as program arguments; the on-disk compile cache (jax.export) must name their type.
jax.export.register_namedtuple_serialization(Row, serialized_name="sdjax.samplers.Row")


def rows(plan: SamplerPlan) -> Row:
    """The plan as scan inputs: a :class:`Row` of (E,) arrays."""
    f32 = lambda values: jnp.asarray(values, jnp.float32)  # noqa: E731
    return Row(
        index=jnp.arange(plan.num_evaluations, dtype=jnp.int32),
        timestep=f32(plan.timesteps),
        c_in=f32(plan.c_in),
        x0_scale=f32(plan.x0_scale),
        noise_scale=f32(plan.noise_scale),
        next_x0_scale=f32(plan.next_x0_scale),
        next_noise_scale=f32(plan.next_noise_scale),
        coef={k: f32(v) for k, v in plan.coefficients},
    )
