"""Samplers: diffusers' schedulers rewritten as one small step function each, looped by one ``lax.scan``.

``make_plan`` does all the host-side bookkeeping a diffusers scheduler does in ``set_timesteps`` (timestep
spacing, sigmas, Karras sigmas, which step uses which order, img2img ``strength``) and returns a static
:class:`SamplerPlan` holding one row of numbers per model evaluation. ``sample`` scans over those rows; each
row calls the model once and then the sampler's step function, which reproduces the matching diffusers
``step`` (SD 1.x config) to float32 rounding:

  ddim              DDIMScheduler                 Song et al. 2021, arXiv:2010.02502, eq. 12 (eta)
  ddpm              DDPMScheduler fixed_small     Ho et al. 2020, arXiv:2006.11239, Algorithm 2
  pndm              PNDMScheduler skip_prk_steps  Liu et al. 2022, arXiv:2202.09778 (PLMS, eq. 12)
  euler             EulerDiscreteScheduler        Karras et al. 2022, arXiv:2206.00364, Algorithm 2 w/o churn
  euler_ancestral   EulerAncestralDiscrete...     k-diffusion ``sample_euler_ancestral``
  dpmpp_2m          DPMSolverMultistepScheduler   Lu et al. 2022, arXiv:2211.01095, Algorithm 2 (dpmsolver++)
  heun              HeunDiscreteScheduler         Karras et al. 2022, Algorithm 1

Latents are float32 NHWC (B, H, W, C) throughout; the model may run in any dtype, its output is cast back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdjax import predictions, schedule
from sdjax.schedule import ScheduleConfig

ModelFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]

# Adams-Bashforth weights on (newest, ..., oldest) model outputs for PLMS modes 2..4 (Liu et al. eq. 12);
# mode 0 is the first Euler step and mode 1 its Heun-style correction.
_PLMS_WEIGHTS = {
    0: (1.0, 0.0, 0.0, 0.0),
    1: (0.5, 0.5, 0.0, 0.0),
    2: (3 / 2, -1 / 2, 0.0, 0.0),
    3: (23 / 12, -16 / 12, 5 / 12, 0.0),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


@dataclasses.dataclass(frozen=True)
class SamplerPlan:
    """Static, hashable description of one sampling run: one entry per model evaluation (E of them).

    Alpha-based samplers (ddim, ddpm, pndm) step between ``alphas_cumprod`` levels ``alphas_t`` ->
    ``alphas_prev``; sigma-based ones between VE noise levels ``sigmas`` -> ``sigmas_next`` (``sigmas_prev`` is
    DPM-Solver's previous level). ``modes`` is the sampler's per-evaluation mode: DDPM 1 = add noise; PLMS
    warm-up 0-1 and order 2-4; DPM-Solver order 1/2; Heun 0 = Euler predictor, 1 = trapezoid corrector.
    """

    name: str
    prediction_type: str
    timesteps: tuple[float, ...]  # what the model is given at each evaluation
    c_in: tuple[float, ...]  # scale_model_input factor at each evaluation
    modes: tuple[int, ...]
    alphas_t: tuple[float, ...] = ()
    alphas_prev: tuple[float, ...] = ()
    sigmas: tuple[float, ...] = ()
    sigmas_next: tuple[float, ...] = ()
    sigmas_prev: tuple[float, ...] = ()
    init_noise_sigma: float = 1.0
    start_x0_scale: float = 1.0  # img2img: x_start = start_x0_scale * x0 + start_noise_scale * noise
    start_noise_scale: float = 0.0
    clip_sample_range: float | None = None

    @property
    def num_evaluations(self) -> int:
        return len(self.timesteps)


def _floats(values) -> tuple[float, ...]:
    return tuple(float(v) for v in np.asarray(values, np.float32))


# ------------------------------------------------------------------------------------------------ planning


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
    one step), and replaces ``strength``.
    """
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
    cfg = cfg.for_class(record.scheduler_class)
    if sampler == "pndm" and cfg.prediction_type == "sample":
        raise ValueError("pndm accepts prediction_type epsilon or v_prediction, not 'sample'")
    karras = cfg.use_karras_sigmas if use_karras_sigmas is None else use_karras_sigmas
    for name, value in (("denoising_start", denoising_start), ("denoising_end", denoising_end)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1):
            raise ValueError(f"{name} must be a number in (0, 1) (a fraction of the schedule), got {value!r}")
    if denoising_start is not None and denoising_end is not None and denoising_start >= denoising_end:
        raise ValueError(f"denoising_start ({denoising_start}) must be below denoising_end ({denoising_end})")
    t_start = num_steps - int(num_steps * strength)
    with jax.ensure_compile_time_eval():  # plans are host data, even when made inside a jit trace
        ac = np.asarray(schedule.alphas_cumprod(cfg))
    if record.karras and cfg.rescale_betas_zero_snr:
        ac = ac.copy()
        ac[-1] = 2.0**-24  # as diffusers: keeps sigma_max finite
    common = dict(
        name=sampler,
        prediction_type=cfg.prediction_type,
        clip_sample_range=cfg.clip_sample_range if cfg.clip_sample else None,
    )
    if denoising_start is not None:
        t_start = _start_step(record, record.plan(cfg, ac, num_steps, 0, karras, common), cfg, denoising_start)
    plan = record.plan(cfg, ac, num_steps, t_start, karras, common)
    if denoising_end is not None:
        cutoff = _cutoff(cfg, denoising_end)
        kept = sum(t >= cutoff for t in plan.timesteps)
        if kept == 0:
            raise ValueError(f"denoising_end={denoising_end} leaves no evaluation of {num_steps} {sampler} steps")
        plan = _first_rows(plan, kept)
    return plan


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


_ROW_FIELDS = ("timesteps", "c_in", "modes", "alphas_t", "alphas_prev", "sigmas", "sigmas_next", "sigmas_prev")


def _first_rows(plan: SamplerPlan, n: int) -> SamplerPlan:
    """The plan cut after its first ``n`` evaluations."""
    return dataclasses.replace(plan, **{f: getattr(plan, f)[:n] for f in _ROW_FIELDS})


def _alpha_at(ac: np.ndarray, t: np.ndarray, final: float) -> np.ndarray:
    """alphas_cumprod[t], with ``final`` where t < 0 (past the end of the chain)."""
    return np.where(t >= 0, ac[np.maximum(t, 0)], np.float32(final))


def _alpha_plan(ts, a_t, a_prev, modes, common) -> SamplerPlan:
    return SamplerPlan(
        timesteps=_floats(ts),
        c_in=(1.0,) * len(ts),
        modes=tuple(int(s) for s in modes),
        alphas_t=_floats(a_t),
        alphas_prev=_floats(a_prev),
        start_x0_scale=float(np.sqrt(a_t[0])),
        start_noise_scale=float(np.sqrt(np.float32(1) - a_t[0])),
        **common,
    )


def _plan_ddim(cfg, ac, num_steps, t_start, karras, common) -> SamplerPlan:
    ts = schedule.inference_timesteps(cfg, num_steps)[t_start:]
    final = 1.0 if cfg.set_alpha_to_one else ac[0]
    # DDIM steps back a fixed T // N even when the spacing is not uniform, as diffusers does.
    a_prev = _alpha_at(ac, ts - cfg.num_train_timesteps // num_steps, final)
    return _alpha_plan(ts, ac[ts], a_prev, np.zeros(len(ts)), common)


def _plan_ddpm(cfg, ac, num_steps, t_start, karras, common) -> SamplerPlan:
    ts_all = schedule.inference_timesteps(cfg, num_steps)
    ts = ts_all[t_start:]
    a_prev = _alpha_at(ac, np.append(ts_all[1:], -1)[t_start:], 1.0)
    return _alpha_plan(ts, ac[ts], a_prev, ts > 0, common)


def _plan_pndm(cfg, ac, num_steps, t_start, karras, common) -> SamplerPlan:
    ts = schedule.plms_timesteps(cfg, num_steps)[t_start:]
    ratio = cfg.num_train_timesteps // num_steps
    counter = np.arange(len(ts))
    # Evaluation 1 re-does step 0 with the averaged slope: it steps from ts[1] + ratio to ts[1].
    t_cur = np.where(counter == 1, ts + ratio, ts)
    t_prev = np.where(counter == 1, ts, ts - ratio)
    final = 1.0 if cfg.set_alpha_to_one else ac[0]
    return _alpha_plan(ts, ac[t_cur], _alpha_at(ac, t_prev, final), np.minimum(counter, 4), common)


def _sigma_plan(ts, sigmas, sigmas_next, modes, cfg, all_sigmas, common, **kw) -> SamplerPlan:
    return SamplerPlan(
        timesteps=_floats(ts),
        c_in=_floats(1 / np.sqrt(sigmas.astype(np.float64) ** 2 + 1)),
        modes=tuple(int(s) for s in modes),
        sigmas=_floats(sigmas),
        sigmas_next=_floats(sigmas_next),
        init_noise_sigma=schedule.init_noise_sigma(cfg, all_sigmas),
        start_noise_scale=float(sigmas[0]),
        **common,
        **kw,
    )


def _plan_euler(cfg, ac, num_steps, t_start, karras, common) -> SamplerPlan:
    sigmas, ts = schedule.discrete_sigmas(ac, cfg, num_steps, karras)
    s = slice(t_start, num_steps)
    return _sigma_plan(ts[s], sigmas[s], sigmas[1:][s], np.zeros(num_steps - t_start), cfg, sigmas, common)


def _plan_heun(cfg, ac, num_steps, t_start, karras, common) -> SamplerPlan:
    sigmas, ts = schedule.discrete_sigmas(ac, cfg, num_steps, karras)
    # Interleave as HeunDiscreteScheduler: predictor at sigma_i, corrector at sigma_{i+1} (none at sigma = 0).
    sig = np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]])
    ts = np.concatenate([ts[:1], np.repeat(ts[1:], 2)])
    k = np.arange(2 * t_start, len(ts))
    return _sigma_plan(ts[k], sig[k], sig[k + 1], k % 2, cfg, sig, common)


def _plan_dpmpp_2m(cfg, ac, num_steps, t_start, karras, common) -> SamplerPlan:
    ts = schedule.dpm_timesteps(cfg, num_steps)
    sigmas_all = ((1 - ac) / ac) ** 0.5
    if karras:
        sigmas = schedule.karras_sigmas(sigmas_all[0], sigmas_all[-1], num_steps)
        ts = schedule.timesteps_from_sigmas(sigmas, ac)
        ts = ts if cfg.beta_schedule == "squaredcos_cap_v2" else ts.round()
    else:
        sigmas = np.interp(ts, np.arange(len(ac)), sigmas_all)
    sigmas = np.append(sigmas, schedule.final_sigma(cfg, ac)).astype(np.float32)
    i = np.arange(t_start, num_steps)
    # First order on the first step (no history) and, by diffusers' rule, on the last one.
    final_first_order = (
        cfg.euler_at_final or (cfg.lower_order_final and num_steps < 15) or cfg.final_sigmas_type == "zero"
    )
    orders = np.where((i == t_start) | ((i == num_steps - 1) & final_first_order), 1, 2)
    alpha0 = np.float32(1) / np.sqrt(sigmas[t_start] ** 2 + np.float32(1))
    return SamplerPlan(
        timesteps=_floats(ts[i]),
        c_in=(1.0,) * len(i),
        modes=tuple(int(o) for o in orders),
        sigmas=_floats(sigmas[i]),
        sigmas_next=_floats(sigmas[i + 1]),
        sigmas_prev=_floats(sigmas[np.maximum(i - 1, t_start)]),
        start_x0_scale=float(alpha0),
        start_noise_scale=float(sigmas[t_start] * alpha0),
        **common,
    )


# ------------------------------------------------------------------------------------------------ helpers


def _alpha_predictions(prediction_type: str, x, out, alpha_t):
    """(x0, eps) at alphas_cumprod level ``alpha_t``: x = sqrt(a) x0 + sqrt(1-a) eps."""
    return predictions.x0_and_eps(prediction_type, x, out, alpha_t**0.5, (1 - alpha_t) ** 0.5)


def _clip(plan: SamplerPlan, x0):
    if plan.clip_sample_range is None:
        return x0
    return jnp.clip(x0, -plan.clip_sample_range, plan.clip_sample_range)


def to_d(x, sigma, denoised):
    """Karras ODE derivative dx/dsigma = (x - D(x; sigma)) / sigma."""
    return (x - denoised) / sigma


def get_ancestral_step(sigma_from, sigma_to):
    """(sigma_down, sigma_up): deterministic step target and fresh-noise level of an ancestral step."""
    sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    sigma_down = jnp.maximum(sigma_to**2 - sigma_up**2, 0.0) ** 0.5
    return sigma_down, sigma_up


# ------------------------------------------------------------------------------------------------ steps
# Every step has the signature (plan, x, state, out, s, noise, eta) -> (x_next, state): ``out`` is the float32
# model output at this evaluation, ``s`` this evaluation's row of the plan, ``noise`` a fresh N(0, 1) draw
# (None when the run is deterministic).


def step_ddim(plan, x, state, out, s, noise, eta):
    """DDIM (Song et al. 2021) eq. 12 with sigma_t = eta * sqrt((1-a_prev)/(1-a_t) (1 - a_t/a_prev))."""
    a_t, a_prev = s["alphas_t"], s["alphas_prev"]
    x0, eps = _alpha_predictions(plan.prediction_type, x, out, a_t)
    x0 = _clip(plan, x0)
    variance = ((1 - a_prev) / (1 - a_t)) * (1 - a_t / a_prev)
    std = eta * variance**0.5
    x_prev = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
    return x_prev if noise is None else x_prev + std * noise, state


def step_ddpm(plan, x, state, out, s, noise, eta):
    """DDPM ancestral step (Ho et al. 2020 eqs. 6-7) with the posterior variance beta-tilde ("fixed_small")."""
    a_t, a_prev = s["alphas_t"], s["alphas_prev"]
    alpha, beta = a_t / a_prev, 1 - a_t / a_prev
    x0 = _clip(plan, _alpha_predictions(plan.prediction_type, x, out, a_t)[0])
    mean = (a_prev**0.5 * beta / (1 - a_t)) * x0 + (alpha**0.5 * (1 - a_prev) / (1 - a_t)) * x
    variance = jnp.maximum((1 - a_prev) / (1 - a_t) * beta, 1e-20)
    return mean + jnp.where(s["modes"] == 1, variance**0.5, 0.0) * noise, state


def _pndm_transfer(prediction_type, x, eps, a_t, a_prev):
    """PNDM's transfer phi(x, eps, t -> t_prev) (Liu et al. eq. 11), the DDIM step written with eps only."""
    if prediction_type == "v_prediction":
        eps = _alpha_predictions(prediction_type, x, eps, a_t)[1]
    denom = a_t * (1 - a_prev) ** 0.5 + (a_t * (1 - a_t) * a_prev) ** 0.5
    return (a_prev / a_t) ** 0.5 * x - (a_prev - a_t) * eps / denom


def step_pndm(plan, x, state, out, s, noise, eta):
    """PLMS (Liu et al. 2022): linear multistep on the last 4 model outputs, Heun-style start."""
    ets, x_first = state  # ets: previous model outputs, newest first (3, B, H, W, C)
    mode = s["modes"]
    w = jnp.asarray(np.array(list(_PLMS_WEIGHTS.values()), np.float32))[mode]
    eps = w[0] * out + jnp.tensordot(w[1:], ets, axes=1)
    x = jnp.where(mode == 1, x_first, x)  # the correction restarts from the first step's sample
    x_first = jnp.where(mode == 0, x, x_first)
    ets = jnp.where(mode == 1, ets, jnp.concatenate([out[None], ets[:-1]]))
    return _pndm_transfer(plan.prediction_type, x, eps, s["alphas_t"], s["alphas_prev"]), (ets, x_first)


def step_euler(plan, x, state, out, s, noise, eta):
    """Euler step of the probability-flow ODE dx/dsigma = (x - D) / sigma (Karras et al. Algorithm 2, S_churn=0)."""
    sigma = s["sigmas"]
    d = to_d(x, sigma, predictions.denoised(plan.prediction_type, x, out, sigma))
    return x + d * (s["sigmas_next"] - sigma), state


def step_euler_ancestral(plan, x, state, out, s, noise, eta):
    """Euler to sigma_down, then fresh noise of std sigma_up (k-diffusion ``sample_euler_ancestral``)."""
    sigma = s["sigmas"]
    sigma_down, sigma_up = get_ancestral_step(sigma, s["sigmas_next"])
    d = to_d(x, sigma, predictions.denoised(plan.prediction_type, x, out, sigma))
    return x + d * (sigma_down - sigma) + noise * sigma_up, state


def step_heun(plan, x, state, out, s, noise, eta):
    """Heun's 2nd-order method (Karras et al. Algorithm 1): Euler predictor, trapezoid corrector."""
    d_first, dt_first, x_first = state
    sigma, corrector = s["sigmas"], s["modes"] == 1
    d = to_d(x, sigma, _clip(plan, predictions.denoised(plan.prediction_type, x, out, sigma)))
    d = jnp.where(corrector, (d_first + d) / 2, d)
    dt = jnp.where(corrector, dt_first, s["sigmas_next"] - sigma)
    x = jnp.where(corrector, x_first, x)
    return x + d * dt, (d, dt, x)


def _vp(sigma):
    """(alpha_t, sigma_t) of the VP process with VE noise level sigma."""
    alpha = 1 / (sigma**2 + 1) ** 0.5
    return alpha, sigma * alpha


def step_dpmpp_2m(plan, x, state, out, s, noise, eta):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2, midpoint form) on the VP sample x = alpha x0 + sigma eps."""
    (x0_last,) = state
    alpha_t, sigma_t = _vp(s["sigmas_next"])
    alpha_s0, sigma_s0 = _vp(s["sigmas"])
    alpha_s1, sigma_s1 = _vp(s["sigmas_prev"])
    x0, _ = predictions.x0_and_eps(plan.prediction_type, x, out, alpha_s0, sigma_s0)
    lambda_t, lambda_s0 = jnp.log(alpha_t) - jnp.log(sigma_t), jnp.log(alpha_s0) - jnp.log(sigma_s0)
    h, h_0 = lambda_t - lambda_s0, lambda_s0 - (jnp.log(alpha_s1) - jnp.log(sigma_s1))
    second = s["modes"] == 2
    r0 = jnp.where(second, h_0 / h, 1.0)  # first-order rows may have h = inf or h_0 = 0
    d1 = (1.0 / r0) * (x0 - x0_last)
    coef = alpha_t * (jnp.exp(-h) - 1.0)
    x_t = (sigma_t / sigma_s0) * x - coef * x0 - jnp.where(second, 0.5, 0.0) * coef * d1
    return x_t, (x0,)


def _no_state(x: jnp.ndarray):
    return ()


def _pndm_state(x: jnp.ndarray):
    return jnp.zeros((3,) + x.shape, x.dtype), jnp.zeros_like(x)  # last 3 model outputs, first-step sample


def _heun_state(x: jnp.ndarray):
    return jnp.zeros_like(x), jnp.zeros((), x.dtype), jnp.zeros_like(x)  # predictor slope, dt, sample


def _dpm_state(x: jnp.ndarray):
    return (jnp.zeros_like(x),)  # previous x0 prediction


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Everything about one sampler, in one record: the diffusers scheduler class it reproduces (whose
    defaults fill what a scheduler config leaves out), the host-side planner, the per-evaluation step, the
    scan state it carries, whether it draws fresh noise at every evaluation and whether it takes Karras
    sigmas. A new sampler is one more record in :data:`REGISTRY`."""

    name: str
    scheduler_class: str
    plan: Callable[..., SamplerPlan]
    step: Callable[..., tuple[jnp.ndarray, Any]]
    initial_state: Callable[[jnp.ndarray], Any]
    stochastic: bool = False
    karras: bool = False
    order: int = 1  # model evaluations per step


REGISTRY: dict[str, Sampler] = {
    s.name: s
    for s in (
        Sampler("ddim", "DDIMScheduler", _plan_ddim, step_ddim, _no_state),  # stochastic only when eta > 0
        Sampler("ddpm", "DDPMScheduler", _plan_ddpm, step_ddpm, _no_state, stochastic=True),
        Sampler("pndm", "PNDMScheduler", _plan_pndm, step_pndm, _pndm_state),
        Sampler("euler", "EulerDiscreteScheduler", _plan_euler, step_euler, _no_state, karras=True),
        Sampler(
            "euler_ancestral",
            "EulerAncestralDiscreteScheduler",
            _plan_euler,
            step_euler_ancestral,
            _no_state,
            stochastic=True,
            karras=True,
        ),
        Sampler("dpmpp_2m", "DPMSolverMultistepScheduler", _plan_dpmpp_2m, step_dpmpp_2m, _dpm_state, karras=True),
        Sampler("heun", "HeunDiscreteScheduler", _plan_heun, step_heun, _heun_state, karras=True, order=2),
    )
}
SAMPLERS: tuple[str, ...] = tuple(REGISTRY)
KARRAS_SAMPLERS: tuple[str, ...] = tuple(name for name, s in REGISTRY.items() if s.karras)


def sampler_for_class(scheduler_class: str, default: str = "ddim") -> str:
    """The sampler that reproduces a diffusers scheduler class (``EulerDiscreteScheduler`` -> "euler"); ``default``
    for classes sdjax has no sampler for."""
    return next((name for name, s in REGISTRY.items() if s.scheduler_class == scheduler_class), default)


# ------------------------------------------------------------------------------------------------ public loop


def initial_latents(plan: SamplerPlan, noise: jnp.ndarray) -> jnp.ndarray:
    """x_T for txt2img: standard-normal ``noise`` (B, H, W, C) times the sampler's ``init_noise_sigma``
    (1 for ddim/ddpm/pndm/dpmpp_2m; sqrt(sigma_max^2 + 1) or sigma_max for the Karras-style samplers). float32.
    """
    return noise.astype(jnp.float32) * jnp.float32(plan.init_noise_sigma)


def noised_latents(plan: SamplerPlan, x0: jnp.ndarray, noise: jnp.ndarray) -> jnp.ndarray:
    """img2img start: clean latents ``x0`` noised to the plan's first step as diffusers' ``add_noise``.

    x0, noise: (B, H, W, C). Returns float32 (B, H, W, C).
    """
    x0, noise = x0.astype(jnp.float32), noise.astype(jnp.float32)
    return jnp.float32(plan.start_x0_scale) * x0 + jnp.float32(plan.start_noise_scale) * noise


def plan_rows(plan: SamplerPlan) -> dict[str, jnp.ndarray]:
    """The plan's per-evaluation values as arrays with a leading (num_evaluations,) axis: what
    :func:`sample_steps` scans over (``index``, ``timesteps``, ``c_in``, sigmas or alphas, ``modes``)."""
    rows = {"index": jnp.arange(plan.num_evaluations, dtype=jnp.int32)}
    for field in ("timesteps", "c_in", "alphas_t", "alphas_prev", "sigmas", "sigmas_next", "sigmas_prev"):
        if getattr(plan, field):
            rows[field] = jnp.asarray(getattr(plan, field), jnp.float32)
    rows["modes"] = jnp.asarray(plan.modes, jnp.int32)
    return rows


def _step_noise(rng: jax.Array, index: jnp.ndarray, shape: tuple[int, ...]) -> jnp.ndarray:
    if rng.shape == ():
        return jax.random.normal(jax.random.fold_in(rng, index), shape, jnp.float32)
    # One key per example: an example's noise does not depend on what else is in the batch.
    return jax.vmap(lambda key: jax.random.normal(jax.random.fold_in(key, index), shape[1:], jnp.float32))(rng)


def sample(
    plan: SamplerPlan,
    model_fn: ModelFn,
    x: jnp.ndarray,
    rng: jax.Array,
    *,
    eta: float | jnp.ndarray = 0.0,
) -> jnp.ndarray:
    """Runs the whole denoising loop of ``plan`` as one ``lax.scan``; returns the final latents.

    x: float32 (B, H, W, C) start latents (``initial_latents`` or ``noised_latents``).
    model_fn(x_in, t) -> model output (B, H, W, C) in the config's prediction type, any float dtype; x_in is
    float32 x already scaled as diffusers' ``scale_model_input``, t a float32 scalar timestep.
    rng: PRNG key, or (B,) keys, one per example; evaluation i draws its noise from ``fold_in(rng, i)`` (per
    example with (B,) keys). eta: DDIM noise scale (0 = deterministic, 1 = DDPM-like), may be traced; ignored by
    other samplers. Returns float32 (B, H, W, C).
    """
    carry = sample_steps(plan, model_fn, initial_carry(plan, x), plan_rows(plan), rng, eta=eta)
    return carry[0]


def initial_carry(plan: SamplerPlan, x: jnp.ndarray) -> tuple[jnp.ndarray, Any]:
    """The loop's carry before the first evaluation: (x float32 (B, H, W, C), the sampler's state)."""
    x = x.astype(jnp.float32)
    return x, REGISTRY[plan.name].initial_state(x)


def sample_steps(
    plan: SamplerPlan,
    model_fn: ModelFn,
    carry: tuple[jnp.ndarray, Any],
    rows: dict[str, jnp.ndarray],
    rng: jax.Array,
    *,
    eta: float | jnp.ndarray = 0.0,
) -> tuple[jnp.ndarray, Any]:
    """Runs the evaluations in ``rows`` (:func:`plan_rows`, or a slice of it) from ``carry`` (x, sampler state)
    as one ``lax.scan`` and returns the carry after them. :func:`sample` is this over every row; a host loop over
    one-row slices (a progress bar) runs the same steps. Arguments as :func:`sample`."""
    record = REGISTRY[plan.name]
    # Drawing noise nobody uses still costs a threefry compile; a literal eta = 0 makes DDIM deterministic.
    stochastic = record.stochastic or (plan.name == "ddim" and not (isinstance(eta, (int, float)) and eta == 0))

    def body(carry, s):
        x, state = carry
        out = model_fn(x * s["c_in"], s["timesteps"]).astype(jnp.float32)
        noise = _step_noise(rng, s["index"], x.shape) if stochastic else None
        return record.step(plan, x, state, out, s, noise, eta), None

    carry, _ = jax.lax.scan(body, carry, rows)
    return carry
