"""The DDPM noise schedule: betas, alphas_cumprod, sigmas, forward noising and timestep spacing.

Numbers match diffusers' schedulers (``DDIMScheduler`` and friends). The schedule is built once on the host in
numpy (float32 betas as diffusers' ``torch.linspace(..., dtype=float32)``, cumulative product accumulated in
float64 as torch does on the CPU) and handed to JAX as float32. ``add_noise``, ``velocity`` and ``snr`` are the
jit-friendly pieces that training shares with the samplers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from sdjax import predictions

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
INTERPOLATION_TYPES = ("linear", "log_linear")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


# diffusers (0.42) scheduler classes: the __init__ defaults of every config field sdjax reads. When a
# scheduler_config.json leaves a field out, the class that runs fills in its own default, so the same file
# means "linspace" spacing to EulerDiscreteScheduler and "leading" to DDIMScheduler. A field a class does not
# take is ignored by that class (diffusers keeps it only as a hidden attribute), and so by sdjax.
_BASE_DEFAULTS = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    prediction_type="epsilon",
    timestep_spacing="leading",
    steps_offset=0,
)
_NOT_SIGMA = dict(use_exponential_sigmas=False, use_beta_sigmas=False)
SCHEDULER_DEFAULTS: dict[str, dict[str, Any]] = {
    "DDIMScheduler": dict(
        _BASE_DEFAULTS,
        clip_sample=True,
        clip_sample_range=1.0,
        set_alpha_to_one=True,
        rescale_betas_zero_snr=False,
        thresholding=False,
    ),
    "DDPMScheduler": dict(
        _BASE_DEFAULTS,
        clip_sample=True,
        clip_sample_range=1.0,
        rescale_betas_zero_snr=False,
        thresholding=False,
        variance_type="fixed_small",
    ),
    "PNDMScheduler": dict(_BASE_DEFAULTS, set_alpha_to_one=False, skip_prk_steps=False),
    "EulerDiscreteScheduler": dict(
        _BASE_DEFAULTS,
        **_NOT_SIGMA,
        timestep_spacing="linspace",
        interpolation_type="linear",
        use_karras_sigmas=False,
        rescale_betas_zero_snr=False,
        final_sigmas_type="zero",
        timestep_type="discrete",
        sigma_min=None,
        sigma_max=None,
    ),
    "EulerAncestralDiscreteScheduler": dict(_BASE_DEFAULTS, timestep_spacing="linspace", rescale_betas_zero_snr=False),
    "DPMSolverMultistepScheduler": dict(
        _BASE_DEFAULTS,
        **_NOT_SIGMA,
        timestep_spacing="linspace",
        use_karras_sigmas=False,
        rescale_betas_zero_snr=False,
        final_sigmas_type="zero",
        lower_order_final=True,
        euler_at_final=False,
        solver_order=2,
        algorithm_type="dpmsolver++",
        solver_type="midpoint",
        thresholding=False,
        use_lu_lambdas=False,
        use_flow_sigmas=False,
        lambda_min_clipped=-math.inf,
        variance_type=None,
    ),
    "HeunDiscreteScheduler": dict(
        _BASE_DEFAULTS,
        **_NOT_SIGMA,
        beta_start=0.00085,
        beta_end=0.012,
        timestep_spacing="linspace",
        use_karras_sigmas=False,
        clip_sample=False,
        clip_sample_range=1.0,
    ),
}
# Scheduler fields sdjax does not model: the values its samplers implement (other values are refused, by name,
# when the sampler's class reads the field). A field absent here and from ScheduleConfig is ignored.
IMPLEMENTED_VALUES: dict[str, tuple[Any, ...]] = {
    "thresholding": (False,),
    "variance_type": ("fixed_small", None),
    "timestep_type": ("discrete",),
    "sigma_min": (None,),
    "sigma_max": (None,),
    "use_exponential_sigmas": (False,),
    "use_beta_sigmas": (False,),
    "use_lu_lambdas": (False,),
    "use_flow_sigmas": (False,),
    "solver_order": (2,),
    "algorithm_type": ("dpmsolver++",),
    "solver_type": ("midpoint",),
    "lambda_min_clipped": (-math.inf,),
}


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """Noise schedule and sampler settings, named as in a diffusers ``scheduler_config.json``.

    Built in code, every field means what it says (the defaults are Stable Diffusion's). Read from a file with
    :meth:`from_dict`, the fields the file leaves out are recorded in ``unset`` and :meth:`for_class` fills each
    with the default of the diffusers scheduler class that runs, exactly as ``SchedulerClass.from_config`` does.
    ``other`` keeps the file's fields sdjax does not model (e.g. ``solver_order``), checked by ``for_class``.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    set_alpha_to_one: bool = False
    rescale_betas_zero_snr: bool = False
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    use_karras_sigmas: bool = False
    skip_prk_steps: bool = True
    interpolation_type: str = "linear"
    final_sigmas_type: str = "zero"
    lower_order_final: bool = True
    euler_at_final: bool = False
    unset: frozenset[str] = frozenset()
    other: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        _check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _check_choice("prediction_type", self.prediction_type, predictions.PREDICTION_TYPES)
        _check_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        _check_choice("interpolation_type", self.interpolation_type, INTERPOLATION_TYPES)
        _check_choice("final_sigmas_type", self.final_sigmas_type, FINAL_SIGMAS_TYPES)
        if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be an int >= 2, got {self.num_train_timesteps!r}")
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise ValueError(
                f"need 0 < beta_start <= beta_end < 1, got beta_start={self.beta_start}, beta_end={self.beta_end}"
            )
        if not isinstance(self.steps_offset, int) or self.steps_offset < 0:
            raise ValueError(f"steps_offset must be an int >= 0, got {self.steps_offset!r}")
        if not self.clip_sample_range > 0:
            raise ValueError(f"clip_sample_range must be > 0, got {self.clip_sample_range!r}")

    @classmethod
    def field_names(cls) -> list[str]:
        """The scheduler fields (everything but the ``unset`` / ``other`` bookkeeping)."""
        return [f.name for f in dataclasses.fields(cls) if f.name not in ("unset", "other")]

    @classmethod
    def from_dict(cls, config: dict[str, Any], **overrides: Any) -> ScheduleConfig:
        """Reads a diffusers scheduler config dict, remembering which fields it sets (see :meth:`for_class`).

        ``overrides`` replace entries of ``config`` and must be field names. A non-null ``trained_betas`` is
        rejected because ignoring it would silently give a different schedule. Keys starting with "_" are
        diffusers' bookkeeping and are dropped.
        """
        names = cls.field_names()
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise ValueError(f"unknown ScheduleConfig override(s) {unknown}; accepted: {names}")
        if config.get("trained_betas") is not None:
            raise ValueError("scheduler config sets trained_betas; sdjax accepts only trained_betas=null")
        merged = {**config, **overrides}
        other = tuple(sorted((k, _hashable(v)) for k, v in merged.items() if k not in names and not k.startswith("_")))
        return cls(
            **{k: merged[k] for k in names if k in merged},
            unset=frozenset(k for k in names if k not in merged),
            other=other,
        )

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, **overrides: Any) -> ScheduleConfig:
        """Reads a diffusers ``scheduler_config.json``; see :meth:`from_dict`."""
        with open(path) as f:
            return cls.from_dict(json.load(f), **overrides)

    def to_dict(self) -> dict[str, Any]:
        """The fields this config sets (not the ``unset`` ones) plus ``other``, as a dict diffusers schedulers'
        ``from_config`` reads to the same schedule."""
        values = {k: getattr(self, k) for k in self.field_names() if k not in self.unset}
        return {**values, **{k: _jsonable(v) for k, v in self.other}}

    def for_class(self, scheduler_class: str) -> ScheduleConfig:
        """The settings diffusers' ``scheduler_class.from_config(self.to_dict())`` runs with: unset fields take
        the class's defaults, fields the class does not read take sdjax's neutral values (no clipping, no
        Karras sigmas, no zero-SNR rescaling...). Raises ValueError, naming the field, for a value of a field
        the class reads that sdjax does not implement (e.g. ``solver_order: 3``, PNDM without
        ``skip_prk_steps``)."""
        defaults = SCHEDULER_DEFAULTS[scheduler_class]
        neutral = {f.name: f.default for f in dataclasses.fields(ScheduleConfig) if f.name not in _BASE_DEFAULTS}
        values = {}
        for name in self.field_names():
            if name not in defaults:
                values[name] = neutral[name]
            else:
                values[name] = defaults[name] if name in self.unset else getattr(self, name)
        other = dict(self.other)
        for name, accepted in IMPLEMENTED_VALUES.items():
            value = other.get(name, defaults.get(name))
            if name in defaults and value not in accepted:
                raise ValueError(
                    f"scheduler config sets {name}={value!r}, which sdjax's {scheduler_class} sampler does not "
                    f"implement; accepted: {', '.join(repr(a) for a in accepted)}"
                )
        if scheduler_class == "PNDMScheduler" and not values["skip_prk_steps"]:
            raise ValueError(
                "pndm is PLMS: it needs skip_prk_steps=true in the scheduler config (as every published SD config "
                "sets); with it false or left out, diffusers' PNDMScheduler runs Runge-Kutta warm-up steps, "
                "which sdjax does not implement"
            )
        return ScheduleConfig(**values)


def _hashable(value: Any) -> Any:
    return tuple(_hashable(v) for v in value) if isinstance(value, list) else value


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, tuple) else value


def _check_choice(field: str, value: Any, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ValueError(f"unknown {field} {value!r}; accepted: {', '.join(accepted)}")


def _cosine_betas(num_steps: int, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal 2021 (arXiv:2102.09672) eq. 17, as diffusers' ``betas_for_alpha_bar``."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    steps = range(num_steps)
    return np.array([min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in steps])


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023 (arXiv:2305.08891) Algorithm 1: shift and scale sqrt(alphas_cumprod) so the last is 0."""
    sqrt_ac = np.sqrt(np.cumprod(1.0 - betas.astype(np.float64)))
    first, last = sqrt_ac[0], sqrt_ac[-1]
    sqrt_ac = (sqrt_ac - last) * (first / (first - last))
    ac = sqrt_ac**2
    alphas = np.concatenate([ac[:1], ac[1:] / ac[:-1]])
    return (1.0 - alphas).astype(np.float32)


def _betas_np(cfg: ScheduleConfig) -> np.ndarray:
    n = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        betas = np.linspace(cfg.beta_start, cfg.beta_end, n).astype(np.float32)
    elif cfg.beta_schedule == "scaled_linear":
        # diffusers squares the float32 linspace, so square after the cast.
        betas = np.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n).astype(np.float32) ** 2
    else:
        betas = _cosine_betas(n).astype(np.float32)
    if cfg.rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    return betas


def _alphas_cumprod_np(cfg: ScheduleConfig) -> np.ndarray:
    alphas = np.float32(1.0) - _betas_np(cfg)
    # torch.cumprod on the CPU accumulates float32 in float64; doing the same keeps us bitwise close.
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def betas(cfg: ScheduleConfig) -> jnp.ndarray:
    """beta_t for t = 0..T-1: float32 (T,), rescaled to zero terminal SNR when the config asks."""
    return jnp.asarray(_betas_np(cfg))


def alphas_cumprod(cfg: ScheduleConfig) -> jnp.ndarray:
    """alpha-bar_t = prod_{s<=t} (1 - beta_s): float32 (T,) (last entry 0 with zero terminal SNR)."""
    return jnp.asarray(_alphas_cumprod_np(cfg))


def sigmas_from_alphas_cumprod(alphas_cumprod: jnp.ndarray) -> jnp.ndarray:
    """Karras et al. 2022 VE noise level sigma_t = sqrt((1 - alpha-bar_t) / alpha-bar_t); same shape and dtype."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def alphas_at(alphas_cumprod: jnp.ndarray, t: jnp.ndarray, ndim: int) -> jnp.ndarray:
    """alphas_cumprod[t] for int t (B,), shaped (B, 1, ...) to broadcast against ``ndim``-d latents. Float32."""
    a = jnp.asarray(alphas_cumprod, jnp.float32)[t]
    return a.reshape(a.shape + (1,) * (ndim - a.ndim))


def add_noise(alphas_cumprod: jnp.ndarray, x0: jnp.ndarray, noise: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    """Forward process q(x_t | x_0) (Ho et al. 2020 eq. 4): sqrt(a_t) x0 + sqrt(1 - a_t) noise.

    alphas_cumprod: float32 (T,); x0, noise: (B, H, W, C); t: int (B,). Returns float32 (B, H, W, C).
    """
    a = alphas_at(alphas_cumprod, t, x0.ndim)
    return a**0.5 * x0 + (1 - a) ** 0.5 * noise


def velocity(alphas_cumprod: jnp.ndarray, x0: jnp.ndarray, noise: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    """v-prediction target (Salimans & Ho 2022, arXiv:2202.00512): sqrt(a_t) noise - sqrt(1 - a_t) x0.

    alphas_cumprod: float32 (T,); x0, noise: (B, H, W, C); t: int (B,). Returns float32 (B, H, W, C).
    """
    a = alphas_at(alphas_cumprod, t, x0.ndim)
    return predictions.model_target("v_prediction", x0, noise, a**0.5, (1 - a) ** 0.5)


def snr(alphas_cumprod: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    """Signal-to-noise ratio a_t / (1 - a_t) (used by min-SNR loss weighting): float32 (B,) for int t (B,)."""
    a = jnp.asarray(alphas_cumprod, jnp.float32)[t]
    return a / (1 - a)


def inference_timesteps(cfg: ScheduleConfig, num_steps: int) -> np.ndarray:
    """Descending int64 (num_steps,) timesteps exactly as diffusers' ``DDIMScheduler.set_timesteps``.

    Spacings are Table 2 of Lin et al. 2023 (arXiv:2305.08891): "leading" adds ``steps_offset``.
    """
    n = cfg.num_train_timesteps
    if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= n:
        raise ValueError(f"num_steps must be an int in [1, {n}] (num_train_timesteps), got {num_steps!r}")
    if cfg.timestep_spacing == "linspace":
        return np.linspace(0, n - 1, num_steps).round()[::-1].astype(np.int64)
    if cfg.timestep_spacing == "leading":
        ts = (np.arange(num_steps) * (n // num_steps))[::-1].astype(np.int64) + cfg.steps_offset
        if ts[0] >= n:
            raise ValueError(
                f"num_steps={num_steps} with leading spacing and steps_offset={cfg.steps_offset} reaches "
                f"timestep {ts[0]} >= num_train_timesteps={n}; use fewer steps or another timestep_spacing"
            )
        return ts
    return np.round(np.arange(n, 0, -n / num_steps)).astype(np.int64) - 1


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 (arXiv:2206.00364) eq. 5: float64 (num_steps,) sigmas from sigma_max down to sigma_min."""
    ramp = np.linspace(0, 1, num_steps)
    # float() so that numpy float32 scalars do not pull the ramp down to float32.
    min_inv_rho, max_inv_rho = float(sigma_min) ** (1 / rho), float(sigma_max) ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def timesteps_from_sigmas(sigmas: np.ndarray, alphas_cumprod: np.ndarray) -> np.ndarray:
    """Fractional training timesteps whose sigma matches ``sigmas`` (log-sigma interpolation, diffusers'
    ``_sigma_to_t``). sigmas: (N,); alphas_cumprod: float32 (T,). Returns float64 (N,)."""
    log_sigmas = np.log(((1 - alphas_cumprod) / alphas_cumprod) ** 0.5)
    log_sigma = np.log(np.maximum(np.asarray(sigmas), 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


# ----------------------------------------------------------- spacing of the samplers' diffusers scheduler classes


def plms_timesteps(cfg: ScheduleConfig, num_steps: int) -> np.ndarray:
    """PNDMScheduler(skip_prk_steps=True) timesteps: the second one repeated, num_steps + 1 in all."""
    ts = inference_timesteps(cfg, num_steps)
    return np.concatenate([ts[:1], ts[1:2], ts[1:]]) if num_steps > 1 else ts


def sigma_timesteps(cfg: ScheduleConfig, num_steps: int) -> np.ndarray:
    """Euler/Heun timesteps: as DDIM's but float32, and not rounded for "linspace"."""
    if cfg.timestep_spacing == "linspace":
        return np.linspace(0, cfg.num_train_timesteps - 1, num_steps)[::-1].astype(np.float32)
    return inference_timesteps(cfg, num_steps).astype(np.float32)


def final_sigma(cfg: ScheduleConfig, ac: np.ndarray) -> float:
    """The level the last step lands on: 0, or sigma at t = 0 for ``final_sigmas_type="sigma_min"``."""
    return float(((1 - ac[0]) / ac[0]) ** 0.5) if cfg.final_sigmas_type == "sigma_min" else 0.0


def discrete_sigmas(ac: np.ndarray, cfg: ScheduleConfig, num_steps: int, karras: bool):
    """Sigmas (N + 1 levels, the last from ``final_sigmas_type``) and model timesteps (N,) as Euler/Heun
    ``set_timesteps``. ``interpolation_type="log_linear"`` spaces N + 1 levels evenly in log sigma and, as
    diffusers, keeps the "linspace" model timesteps and runs the first N + 1 levels (ending at sigma_min)."""
    ts = sigma_timesteps(cfg, num_steps)
    all_sigmas = ((1 - ac) / ac) ** 0.5
    if cfg.interpolation_type == "log_linear":
        sigmas = np.exp(np.linspace(np.log(all_sigmas[-1]), np.log(all_sigmas[0]), num_steps + 1, dtype=np.float32))
    else:
        sigmas = np.interp(ts, np.arange(len(ac)), all_sigmas)
    if karras:
        sigmas = karras_sigmas(sigmas[-1], sigmas[0], num_steps)
        ts = timesteps_from_sigmas(sigmas, ac)
    sigmas = np.append(sigmas, final_sigma(cfg, ac))[: num_steps + 1]
    return sigmas.astype(np.float32), ts.astype(np.float32)


def init_noise_sigma(cfg: ScheduleConfig, sigmas: np.ndarray) -> float:
    sigma_max = sigmas.max()
    if cfg.timestep_spacing == "leading":
        return float((sigma_max**2 + 1) ** 0.5)
    return float(sigma_max)


def dpm_timesteps(cfg: ScheduleConfig, num_steps: int) -> np.ndarray:
    """DPMSolverMultistepScheduler spacing: leading/linspace space N + 1 points and drop the last."""
    if cfg.timestep_spacing == "trailing":
        return inference_timesteps(cfg, num_steps)
    n = cfg.num_train_timesteps
    if cfg.timestep_spacing == "linspace":
        return np.linspace(0, n - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
    ratio = n // (num_steps + 1)
    return (np.arange(num_steps + 1) * ratio)[::-1][:-1].astype(np.int64) + cfg.steps_offset
