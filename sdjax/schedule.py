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
from sdjax.scheduler_classes import BASE_FIELDS, IMPLEMENTED_VALUES, SCHEDULER_DEFAULTS, VALUE_ALIASES

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
INTERPOLATION_TYPES = ("linear", "log_linear")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
SOLVER_FIELDS = frozenset(
    {
        "solver_order",
        "solver_type",
        "algorithm_type",
        "disable_corrector",
        "original_inference_steps",
        "timestep_scaling",
    }
)
# Values of multistep-solver fields sdjax implements, checked only for a class that reads the field (a DPM-Solver
# config's algorithm_type "dpmsolver" does not stop a model from loading, or from sampling with euler).
SOLVER_CHOICES = {
    "solver_order": (1, 2, 3),
    "solver_type": ("midpoint", "heun", "bh1", "bh2", "logrho"),
    "algorithm_type": ("dpmsolver++", "sde-dpmsolver++", "deis"),
}
# Fields of diffusers scheduler configs that no class sdjax reproduces reads (bookkeeping, or settings that
# matter only with a refused value, such as dynamic_thresholding_ratio without thresholding).
IGNORED_FIELDS = frozenset(
    {"trained_betas", "dynamic_thresholding_ratio", "sample_max_value", "flow_shift", "time_shift_type"}
)
KNOWN_FIELDS = IGNORED_FIELDS | set(IMPLEMENTED_VALUES) | {f for d in SCHEDULER_DEFAULTS.values() for f in d}


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """Noise schedule and sampler settings, named as in a diffusers ``scheduler_config.json``.

    Built in code, every field means what it says (the defaults are Stable Diffusion's). Read from a file with
    :meth:`from_dict`, the fields the file leaves out are recorded in ``unset`` and :meth:`for_class` fills each
    with the default of the diffusers scheduler class that runs, exactly as ``SchedulerClass.from_config`` does.
    ``other`` keeps the file's fields sdjax does not model (e.g. ``thresholding``), checked by ``for_class``.
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
    solver_order: int = 2  # DPM-Solver(++), UniPC, DEIS: 1-3 (3 with dpmpp_2m is DPM++ 3M)
    solver_type: str = "midpoint"
    algorithm_type: str = "dpmsolver++"
    disable_corrector: tuple[int, ...] = ()  # UniPC: steps whose corrector is skipped
    original_inference_steps: int = 50  # LCM / TCD: the distillation schedule's step count
    timestep_scaling: float = 10.0  # LCM / TCD: consistency boundary-condition scaling
    # A config built in code leaves the solver fields unset while they are at their defaults, so that to_dict
    # (a written scheduler_config.json) does not carry settings of classes the model does not use.
    unset: frozenset[str] = SOLVER_FIELDS
    other: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        changed = {
            f.name for f in dataclasses.fields(self) if f.name in SOLVER_FIELDS and getattr(self, f.name) != f.default
        }
        object.__setattr__(self, "unset", frozenset(self.unset - changed))
        _check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _check_choice("prediction_type", self.prediction_type, predictions.PREDICTION_TYPES)
        _check_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        _check_choice("interpolation_type", self.interpolation_type, INTERPOLATION_TYPES)
        _check_choice("final_sigmas_type", self.final_sigmas_type, FINAL_SIGMAS_TYPES)
        _check_int("num_train_timesteps", self.num_train_timesteps, 2)
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise ValueError(
                f"need 0 < beta_start <= beta_end < 1, got beta_start={self.beta_start}, beta_end={self.beta_end}"
            )
        _check_int("steps_offset", self.steps_offset, 0)
        _check_int("original_inference_steps", self.original_inference_steps, 1)
        if not self.clip_sample_range > 0:
            raise ValueError(f"clip_sample_range must be > 0, got {self.clip_sample_range!r}")
        if not (isinstance(self.timestep_scaling, (int, float)) and self.timestep_scaling > 0):
            raise ValueError(f"timestep_scaling must be a number > 0, got {self.timestep_scaling!r}")
        if not isinstance(self.disable_corrector, tuple) or not all(isinstance(i, int) for i in self.disable_corrector):
            raise ValueError(f"disable_corrector must be a list of step indices, got {self.disable_corrector!r}")

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
            **{k: _hashable(merged[k]) for k in names if k in merged},
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

    def for_class(self, scheduler_class: str, pinned: dict[str, Any] | None = None) -> ScheduleConfig:
        """The settings diffusers' ``scheduler_class.from_config(self.to_dict())`` runs with: unset fields take
        the class's defaults, values the class rewrites are rewritten (a DPM-Solver ``solver_type`` given to
        UniPC), fields the class does not read take sdjax's neutral values (no clipping, no Karras sigmas, no
        zero-SNR rescaling...). ``pinned`` fields are set whatever the config says (the sampler name decides
        them, e.g. dpmpp_2m_sde's ``algorithm_type``). Raises ValueError, naming the field, for a value of a field
        the class reads that sdjax does not implement (e.g. ``thresholding: true``, PNDM without
        ``skip_prk_steps``)."""
        defaults = SCHEDULER_DEFAULTS[scheduler_class]
        aliases = VALUE_ALIASES.get(scheduler_class, {})
        neutral = {f.name: f.default for f in dataclasses.fields(ScheduleConfig) if f.name not in BASE_FIELDS}
        values = {}
        for name in self.field_names():
            if name not in defaults:
                values[name] = neutral[name]
            else:
                value = defaults[name] if name in self.unset else getattr(self, name)
                values[name] = aliases.get(name, {}).get(value, value)
        values.update(pinned or {})
        other = dict(self.other)
        for name, accepted in (*IMPLEMENTED_VALUES.items(), *SOLVER_CHOICES.items()):
            value = values[name] if name in SOLVER_CHOICES else other.get(name, defaults.get(name))
            if name in defaults and (value not in accepted or (isinstance(value, bool) and name == "solver_order")):
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
        return ScheduleConfig(**values, unset=frozenset())

    def updated(self, changes: dict[str, Any]) -> ScheduleConfig:
        """This config with the scheduler config fields ``changes`` set, as if the file had them (a per-call
        ``scheduler_config``). ValueError, one line, for a field no diffusers scheduler class sdjax reproduces
        knows (a typo) or a bad value."""
        if not isinstance(changes, dict) or not all(isinstance(k, str) for k in changes):
            raise ValueError(f"scheduler_config must be a dict of field names to values, got {changes!r:.80}")
        known = KNOWN_FIELDS | set(self.field_names())
        unknown = sorted(k for k in changes if k not in known and not k.startswith("_"))
        if unknown:
            raise ValueError(f"unknown scheduler config field(s) {unknown}; accepted: {', '.join(sorted(known))}")
        return ScheduleConfig.from_dict({**self.to_dict(), **changes})


def _hashable(value: Any) -> Any:
    return tuple(_hashable(v) for v in value) if isinstance(value, list) else value


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, tuple) else value


def _check_choice(field: str, value: Any, accepted: tuple[Any, ...]) -> None:
    if isinstance(value, bool) or value not in accepted:
        raise ValueError(f"unknown {field} {value!r}; accepted: {', '.join(map(str, accepted))}")


def _check_int(field: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{field} must be an int >= {low}, got {value!r}")


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
