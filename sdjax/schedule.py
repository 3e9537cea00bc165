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

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """Noise schedule settings, named and defaulted as in a Stable Diffusion ``scheduler_config.json``."""

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

    def __post_init__(self):
        _check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        _check_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
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
    def from_dict(cls, config: dict[str, Any], **overrides: Any) -> ScheduleConfig:
        """Reads a diffusers scheduler config dict; keys sdjax does not use are ignored.

        ``overrides`` replace entries of ``config`` and must be field names. A non-null ``trained_betas`` is
        rejected because ignoring it would silently give a different schedule.
        """
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise ValueError(f"unknown ScheduleConfig override(s) {unknown}; accepted: {names}")
        if config.get("trained_betas") is not None:
            raise ValueError("scheduler config sets trained_betas; sdjax accepts only trained_betas=null")
        merged = {**config, **overrides}
        return cls(**{k: merged[k] for k in names if k in merged})

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, **overrides: Any) -> ScheduleConfig:
        """Reads a diffusers ``scheduler_config.json``; see :meth:`from_dict`."""
        with open(path) as f:
            return cls.from_dict(json.load(f), **overrides)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict, readable by diffusers schedulers' ``from_config``."""
        return dataclasses.asdict(self)


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


def _per_example(alphas_cumprod: jnp.ndarray, t: jnp.ndarray, ndim: int) -> jnp.ndarray:
    a = jnp.asarray(alphas_cumprod, jnp.float32)[t]
    return a.reshape(a.shape + (1,) * (ndim - a.ndim))


def add_noise(alphas_cumprod: jnp.ndarray, x0: jnp.ndarray, noise: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    """Forward process q(x_t | x_0) (Ho et al. 2020 eq. 4): sqrt(a_t) x0 + sqrt(1 - a_t) noise.

    alphas_cumprod: float32 (T,); x0, noise: (B, H, W, C); t: int (B,). Returns float32 (B, H, W, C).
    """
    a = _per_example(alphas_cumprod, t, x0.ndim)
    return a**0.5 * x0 + (1 - a) ** 0.5 * noise


def velocity(alphas_cumprod: jnp.ndarray, x0: jnp.ndarray, noise: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    """v-prediction target (Salimans & Ho 2022, arXiv:2202.00512): sqrt(a_t) noise - sqrt(1 - a_t) x0.

    alphas_cumprod: float32 (T,); x0, noise: (B, H, W, C); t: int (B,). Returns float32 (B, H, W, C).
    """
    a = _per_example(alphas_cumprod, t, x0.ndim)
    return a**0.5 * noise - (1 - a) ** 0.5 * x0


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
