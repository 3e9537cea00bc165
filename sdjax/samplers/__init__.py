"""Samplers: diffusers' schedulers rewritten as one small file each, looped by one ``lax.scan``.

``make_plan`` does on the host what a diffusers scheduler does in ``set_timesteps`` (timestep spacing, sigmas,
Karras sigmas, solver orders and weights, img2img ``strength``) and returns a static :class:`SamplerPlan` with one
row of numbers per model evaluation; ``sample`` scans over those rows, calling the model once per row and then
the sampler's step, which reproduces the matching diffusers ``step`` to float32 rounding.

  name             diffusers class                    method
  ddim             DDIMScheduler                      Song et al. 2021, arXiv:2010.02502
  ddpm             DDPMScheduler                      Ho et al. 2020, arXiv:2006.11239
  pndm             PNDMScheduler (skip_prk_steps)     Liu et al. 2022, arXiv:2202.09778 (PLMS)
  euler            EulerDiscreteScheduler             Karras et al. 2022, arXiv:2206.00364, Alg. 2
  euler_ancestral  EulerAncestralDiscreteScheduler    k-diffusion sample_euler_ancestral
  dpmpp_2m         DPMSolverMultistepScheduler        Lu et al. 2022, arXiv:2211.01095 (solver_order 3: 3M)
  heun             HeunDiscreteScheduler              Karras et al. 2022, Alg. 1
  unipc            UniPCMultistepScheduler            Zhao et al. 2023, arXiv:2302.04867
  lms              LMSDiscreteScheduler               k-diffusion sample_lms
  deis             DEISMultistepScheduler             Zhang & Chen 2023, arXiv:2204.13902
  dpm2             KDPM2DiscreteScheduler             k-diffusion sample_dpm_2
  dpm2_ancestral   KDPM2AncestralDiscreteScheduler    k-diffusion sample_dpm_2_ancestral
  dpmpp_sde        DPMSolverSDEScheduler              k-diffusion sample_dpmpp_sde (Brownian noise)
  dpmpp_2m_sde     DPMSolverMultistepScheduler        Lu et al. 2022 (algorithm_type sde-dpmsolver++)
  lcm              LCMScheduler                       Luo et al. 2023, arXiv:2310.04378
  tcd              TCDScheduler                       Zheng et al. 2024, arXiv:2402.19159 (gamma = eta)

Each sampler is one file named after it (its plan, scan state and step, its math cited); the loop
(``loop.py``), the rows every task can read (``plan.py``), the tasks' hooks (``hooks.py``) and the step noise
(``noise.py``) are shared. Latents are float32 NHWC (B, H, W, C) throughout; the model may run in any dtype.
"""

from sdjax.samplers.hooks import Hooks
from sdjax.samplers.loop import ModelFn, initial_carry, initial_latents, noised_latents, sample, sample_steps
from sdjax.samplers.plan import Row, SamplerPlan
from sdjax.samplers.plan import rows as plan_rows
from sdjax.samplers.planning import make_plan
from sdjax.samplers.record import Sampler
from sdjax.samplers.registry import KARRAS_SAMPLERS, REGISTRY, SAMPLERS, sampler_for_class
from sdjax.samplers.sigmas import ancestral_step, karras_sigmas, to_d

__all__ = [
    "KARRAS_SAMPLERS",
    "REGISTRY",
    "SAMPLERS",
    "Hooks",
    "ModelFn",
    "Row",
    "Sampler",
    "SamplerPlan",
    "ancestral_step",
    "initial_carry",
    "initial_latents",
    "karras_sigmas",
    "make_plan",
    "noised_latents",
    "plan_rows",
    "sample",
    "sample_steps",
    "sampler_for_class",
    "to_d",
]
