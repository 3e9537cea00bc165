"""Driving diffusers' schedulers and sdjax's samplers side by side on a toy model (shared by the sampler tests).

diffusers runs as its Stable Diffusion pipelines do (``set_timesteps``, img2img ``set_begin_index``,
``scale_model_input``, ``step`` with ``eta`` where the class takes it); a toy "model" is written identically in
torch and JAX. For the stochastic samplers diffusers' noise is replaced by sdjax's (evaluation i's Gaussian is
``normal(fold_in(key, i))``; DPM-Solver-SDE's Brownian increments come from sdjax's tree), so that the two runs
must agree as the deterministic ones do.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
from unittest import mock

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import torch

from sdjax import samplers
from sdjax.samplers.noise import StepNoise
from sdjax.schedule import ScheduleConfig

SD15 = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "clip_sample": False,
}
SHAPE = (2, 8, 8, 4)
KEY = jax.random.key(0)


def toy_torch(x, t):
    return 0.3 * torch.tanh(x) + 0.1 * torch.cos(torch.as_tensor(t, dtype=torch.float32) / 300) * x


def toy_jax(x, t):
    return 0.3 * jnp.tanh(x) + 0.1 * jnp.cos(t / 300) * x


def start(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(noise, x0) float32 NHWC."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal(SHAPE).astype(np.float32), 0.5 * rng.standard_normal(SHAPE).astype(np.float32)


def to_torch(x) -> torch.Tensor:
    return torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous()


def to_numpy(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).numpy()


def diffusers_scheduler(name: str, steps: int, karras: bool = False, strength: float = 1.0, **config):
    """sdjax sampler ``name``'s diffusers class from the SD 1.5 config (plus ``config`` and the sampler's pinned
    fields) after ``set_timesteps`` and the img2img begin index, and the timesteps to run."""
    record = samplers.REGISTRY[name]
    extra = {"use_karras_sigmas": True} if karras else {}
    scheduler = getattr(diffusers, record.scheduler_class).from_config(
        {**SD15, **config, **dict(record.pinned)}, **extra
    )
    scheduler.set_timesteps(steps)
    t_start = steps - int(steps * strength)  # StableDiffusionImg2ImgPipeline.get_timesteps
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    return scheduler, scheduler.timesteps[t_start * scheduler.order :]


@contextlib.contextmanager
def sdjax_noise(scheduler, plan: samplers.SamplerPlan, current: dict):
    """Inside: the scheduler module's Gaussian draws return ``current["noise"]``, its Brownian noise sampler sdjax's
    increments at the plan's levels (diffusers' float32 sigmas are matched to the plan's nearest row: W is rough,
    so 1e-7 apart is a different draw)."""
    module = importlib.import_module(type(scheduler).__module__)
    rows = dict(plan.coefficients)
    names = ("noise_from", "noise_to") if "noise_from" in rows else ()
    levels = [
        {k: rows[f"{name}{k}"][i] for k in ("", "_leaf", "_frac")} for name in names for i in range(len(rows[name]))
    ]

    class Brownian:
        def __init__(self, *args, **kwargs):
            pass

        def __call__(self, sigma, sigma_next):
            nearest = [min(levels, key=lambda level: abs(level[""] - float(v))) for v in (sigma, sigma_next)]
            row = {f"{n}{k}": jnp.float32(v) for n, level in zip("ab", nearest, strict=True) for k, v in level.items()}
            return to_torch(np.asarray(_brownian(row, plan.constant("brownian_top"))))

    with contextlib.ExitStack() as stack:
        if hasattr(module, "randn_tensor"):
            stack.enter_context(mock.patch.object(module, "randn_tensor", lambda *a, **k: current["noise"]))
        if hasattr(module, "BrownianTreeNoiseSampler"):
            stack.enter_context(mock.patch.object(module, "BrownianTreeNoiseSampler", Brownian))
        yield


@functools.partial(jax.jit, static_argnums=1)
def _brownian(row: dict, sigma_top: float) -> jax.Array:
    return StepNoise(KEY, jnp.int32(0), SHAPE, sigma_top).brownian(row, "a", "b")


def step_noise(i: int) -> torch.Tensor:
    """sdjax's Gaussian noise of evaluation i for the batch key ``KEY`` (NCHW)."""
    return to_torch(np.asarray(jax.random.normal(jax.random.fold_in(KEY, i), SHAPE, jnp.float32)))


def diffusers_run(name, steps, karras=False, strength=1.0, eta=0.0, plan=None, **config):
    """Final latents (NHWC) and the timesteps the toy model saw, looping as the SD pipelines do; with ``plan``
    (sdjax's) the stochastic samplers draw sdjax's noise."""
    noise, x0 = start()
    scheduler, timesteps = diffusers_scheduler(name, steps, karras, strength, **config)
    if strength < 1:
        x = scheduler.add_noise(to_torch(x0), to_torch(noise), timesteps[:1].repeat(SHAPE[0]))
    else:
        x = to_torch(noise) * scheduler.init_noise_sigma
    takes_eta = "eta" in inspect.signature(scheduler.step).parameters  # prepare_extra_step_kwargs
    current, seen = {}, []
    with sdjax_noise(scheduler, plan, current) if plan is not None else contextlib.nullcontext():
        for i, t in enumerate(timesteps):
            seen.append(float(t))
            current["noise"] = step_noise(i)
            out = toy_torch(scheduler.scale_model_input(x, t), t)
            x = scheduler.step(out, t, x, **({"eta": eta} if takes_eta else {})).prev_sample
    return to_numpy(x), np.array(seen)


def sdjax_run(name, steps, karras=False, strength=1.0, eta=0.0, hooks=(), **config):
    """(final latents, timesteps the toy model saw, the plan)."""
    noise, x0 = start()
    cfg = ScheduleConfig.from_dict({**SD15, **config})
    plan = samplers.make_plan(cfg, name, steps, strength=strength, use_karras_sigmas=karras or None)
    seen = []

    def model_fn(x, t):
        jax.debug.callback(seen.append, t, ordered=True)
        return toy_jax(x, t)

    if strength < 1:
        x = samplers.noised_latents(plan, jnp.asarray(x0), jnp.asarray(noise))
    else:
        x = samplers.initial_latents(plan, jnp.asarray(noise))
    out = np.asarray(samplers.sample(plan, model_fn, x, KEY, eta=eta, hooks=hooks))
    jax.effects_barrier()
    return out, np.array(seen, np.float64), plan
