"""DPM-Solver++(2M) SDE: the multistep second-order solver of the diffusion SDE in data-prediction form (Lu et
al. 2022, arXiv:2211.01095, Sec. 5 and Appendix; the k-diffusion ``sample_dpmpp_2m_sde`` family), fresh Gaussian
noise at every step; diffusers ``DPMSolverMultistepScheduler`` with ``algorithm_type="sde-dpmsolver++"`` (the
sampler's name sets it). ``solver_order: 3`` gives DPM++ 3M SDE."""

from __future__ import annotations

from sdjax.samplers import dpmpp_2m
from sdjax.samplers.record import Sampler


def step(plan, x, state, out, row, noise, eta):
    x, state = dpmpp_2m.update(plan, x, state, out, row)
    return x + row.coef["c_noise"] * noise.normal(), state


SAMPLER = Sampler(
    "dpmpp_2m_sde",
    "DPMSolverMultistepScheduler",
    dpmpp_2m.plan,
    step,
    dpmpp_2m.initial_state,
    noise="always",
    karras=True,
    pinned=(("algorithm_type", "sde-dpmsolver++"),),
    finite_sigma_max=True,
)
