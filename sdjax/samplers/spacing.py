"""Which timesteps and noise levels each diffusers scheduler class visits: its ``set_timesteps``, on the host.

Three families share code here: the k-diffusion ports (Euler, Heun, LMS, KDPM2, DPM-Solver SDE: N levels
interpolated at N timesteps, then 0), the multistep solvers (DPM-Solver, UniPC, DEIS: N + 1 points with the last
dropped), and PLMS. The consistency samplers (LCM, TCD) space their own (see ``lcm.py``).
"""

from __future__ import annotations

import numpy as np

from sdjax.samplers.sigmas import all_sigmas, karras_sigmas, timesteps_from_sigmas
from sdjax.schedule import ScheduleConfig, inference_timesteps


def plms_timesteps(cfg: ScheduleConfig, num_steps: int) -> np.ndarray:
    """PNDMScheduler(skip_prk_steps=True) timesteps: the second one repeated, num_steps + 1 in all."""
    ts = inference_timesteps(cfg, num_steps)
    return np.concatenate([ts[:1], ts[1:2], ts[1:]]) if num_steps > 1 else ts


def sigma_timesteps(cfg: ScheduleConfig, num_steps: int) -> np.ndarray:
    """k-diffusion-port timesteps: as DDIM's but float32, and not rounded for "linspace"."""
    if cfg.timestep_spacing == "linspace":
        return np.linspace(0, cfg.num_train_timesteps - 1, num_steps)[::-1].astype(np.float32)
    return inference_timesteps(cfg, num_steps).astype(np.float32)


def final_sigma(cfg: ScheduleConfig, ac: np.ndarray) -> float:
    """The level the last step lands on: 0, or sigma at t = 0 for ``final_sigmas_type="sigma_min"``."""
    return float(all_sigmas(ac[:1])[0]) if cfg.final_sigmas_type == "sigma_min" else 0.0


def discrete_sigmas(ac: np.ndarray, cfg: ScheduleConfig, num_steps: int, karras: bool, round_karras: bool = False):
    """Sigmas (N + 1 levels, the last from ``final_sigmas_type``) and model timesteps (N,) float32, as the
    k-diffusion ports' ``set_timesteps``. ``interpolation_type="log_linear"`` (Euler) spaces N + 1 levels evenly in
    log sigma and, as diffusers, keeps the "linspace" model timesteps and runs the first N + 1 levels (ending at
    sigma_min). ``round_karras``: the class rounds Karras timesteps to integers (KDPM2)."""
    ts = sigma_timesteps(cfg, num_steps)
    sigmas_all = all_sigmas(ac)
    if cfg.interpolation_type == "log_linear":
        sigmas = np.exp(np.linspace(np.log(sigmas_all[-1]), np.log(sigmas_all[0]), num_steps + 1, dtype=np.float32))
    else:
        sigmas = np.interp(ts, np.arange(len(ac)), sigmas_all)
    if karras:
        sigmas = karras_sigmas(sigmas[-1], sigmas[0], num_steps)
        ts = timesteps_from_sigmas(sigmas, ac)
        ts = ts.round() if round_karras else ts
    sigmas = np.append(sigmas, final_sigma(cfg, ac))[: num_steps + 1]
    return sigmas.astype(np.float32), ts.astype(np.float32)


def init_noise_sigma(cfg: ScheduleConfig, sigmas: np.ndarray) -> float:
    """The std of x_T for the sigma samplers: sigma_max, or sqrt(sigma_max^2 + 1) with "leading" spacing."""
    sigma_max = sigmas.max()
    if cfg.timestep_spacing == "leading":
        return float((sigma_max**2 + 1) ** 0.5)
    return float(sigma_max)


def multistep_timesteps(cfg: ScheduleConfig, num_steps: int) -> np.ndarray:
    """DPM-Solver / UniPC / DEIS spacing: leading and linspace space N + 1 points and drop the last."""
    if cfg.timestep_spacing == "trailing":
        return inference_timesteps(cfg, num_steps)
    n = cfg.num_train_timesteps
    if cfg.timestep_spacing == "linspace":
        return np.linspace(0, n - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
    ratio = n // (num_steps + 1)
    return (np.arange(num_steps + 1) * ratio)[::-1][:-1].astype(np.int64) + cfg.steps_offset


def multistep_sigmas(
    ac: np.ndarray, cfg: ScheduleConfig, num_steps: int, karras: bool, round_karras: bool, final, karras_final=None
):
    """(model timesteps (N,) float64, sigmas (N + 1,) float32 ending at ``final``) of the multistep solvers'
    ``set_timesteps``: sigmas interpolated at the timesteps, or Karras sigmas over the whole training range
    with timesteps read back from them (rounded when ``round_karras``). ``karras_final="last"``: with Karras
    sigmas the run ends on the ramp's last level (UniPC's sigma_min, DEIS), which is sigma_max for one step."""
    ts = multistep_timesteps(cfg, num_steps).astype(np.float64)
    sigmas_all = all_sigmas(ac)
    if karras:
        sigmas = karras_sigmas(sigmas_all[0], sigmas_all[-1], num_steps)
        ts = timesteps_from_sigmas(sigmas, ac)
        ts = ts.round() if round_karras else ts
        final = sigmas[-1] if karras_final == "last" else final
    else:
        sigmas = np.interp(ts, np.arange(len(ac)), sigmas_all)
    return ts, np.append(sigmas, final).astype(np.float32)
