"""The diffusers (0.42) scheduler classes sdjax's samplers reproduce: each class's defaults, the values it silently
rewrites, and the values of fields sdjax does not model that its samplers implement.

When a ``scheduler_config.json`` leaves a field out, the class that runs fills in its own ``__init__`` default, so
the same file means "linspace" spacing to ``EulerDiscreteScheduler`` and "leading" to ``DDIMScheduler``
(:meth:`sdjax.schedule.ScheduleConfig.for_class` applies these tables). A field a class does not take is ignored
by that class (diffusers keeps it only as a hidden attribute), and so by sdjax.
"""

from __future__ import annotations

import math
from typing import Any

_BASE = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    prediction_type="epsilon",
    timestep_spacing="leading",
    steps_offset=0,
)
BASE_FIELDS = frozenset(_BASE)
_NOT_SIGMA = dict(use_exponential_sigmas=False, use_beta_sigmas=False)
_K_DIFFUSION = dict(  # the k-diffusion ports (KDPM2*, DPMSolverSDE, LMS): linspace, Karras option, no offset
    _BASE, **_NOT_SIGMA, timestep_spacing="linspace", use_karras_sigmas=False
)
_MULTISTEP = dict(  # DPM-Solver / UniPC / DEIS share these
    _BASE,
    **_NOT_SIGMA,
    timestep_spacing="linspace",
    use_karras_sigmas=False,
    lower_order_final=True,
    solver_order=2,
    thresholding=False,
    use_flow_sigmas=False,
    use_dynamic_shifting=False,
)
_CONSISTENCY = dict(  # LCMScheduler and TCDScheduler
    _BASE,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    set_alpha_to_one=True,
    rescale_betas_zero_snr=False,
    clip_sample=False,
    clip_sample_range=1.0,
    original_inference_steps=50,
    timestep_scaling=10.0,
    thresholding=False,
)

SCHEDULER_DEFAULTS: dict[str, dict[str, Any]] = {
    "DDIMScheduler": dict(
        _BASE,
        clip_sample=True,
        clip_sample_range=1.0,
        set_alpha_to_one=True,
        rescale_betas_zero_snr=False,
        thresholding=False,
    ),
    "DDPMScheduler": dict(
        _BASE,
        clip_sample=True,
        clip_sample_range=1.0,
        rescale_betas_zero_snr=False,
        thresholding=False,
        variance_type="fixed_small",
    ),
    "PNDMScheduler": dict(_BASE, set_alpha_to_one=False, skip_prk_steps=False),
    "EulerDiscreteScheduler": dict(
        _BASE,
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
    "EulerAncestralDiscreteScheduler": dict(_BASE, timestep_spacing="linspace", rescale_betas_zero_snr=False),
    "DPMSolverMultistepScheduler": dict(
        _MULTISTEP,
        rescale_betas_zero_snr=False,
        final_sigmas_type="zero",
        euler_at_final=False,
        algorithm_type="dpmsolver++",
        solver_type="midpoint",
        use_lu_lambdas=False,
        lambda_min_clipped=-math.inf,
        variance_type=None,
    ),
    "HeunDiscreteScheduler": dict(
        _K_DIFFUSION, beta_start=0.00085, beta_end=0.012, clip_sample=False, clip_sample_range=1.0
    ),
    "UniPCMultistepScheduler": dict(
        _MULTISTEP,
        rescale_betas_zero_snr=False,
        final_sigmas_type="zero",
        solver_type="bh2",
        predict_x0=True,
        disable_corrector=(),
        solver_p=None,
        sigma_min=None,
        sigma_max=None,
        shift_terminal=None,
    ),
    "LMSDiscreteScheduler": dict(_K_DIFFUSION),
    "DEISMultistepScheduler": dict(_MULTISTEP, solver_type="logrho", algorithm_type="deis"),
    "KDPM2DiscreteScheduler": dict(_K_DIFFUSION, beta_start=0.00085, beta_end=0.012),
    "KDPM2AncestralDiscreteScheduler": dict(_K_DIFFUSION, beta_start=0.00085, beta_end=0.012),
    "DPMSolverSDEScheduler": dict(_K_DIFFUSION, beta_start=0.00085, beta_end=0.012, noise_sampler_seed=None),
    "LCMScheduler": dict(_CONSISTENCY),
    "TCDScheduler": dict(_CONSISTENCY),
}

# Values a class accepts but replaces, as its __init__ does with register_to_config (a DPM-Solver config's
# solver_type "midpoint" runs UniPC's "bh2"), so that one model's scheduler config drives every sampler.
VALUE_ALIASES: dict[str, dict[str, dict[Any, Any]]] = {
    "DPMSolverMultistepScheduler": {
        "algorithm_type": {"deis": "dpmsolver++"},
        "solver_type": {"logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"},
    },
    "UniPCMultistepScheduler": {"solver_type": {"midpoint": "bh2", "heun": "bh2", "logrho": "bh2"}},
    "DEISMultistepScheduler": {
        "algorithm_type": {"dpmsolver": "deis", "dpmsolver++": "deis"},
        "solver_type": {"midpoint": "logrho", "heun": "logrho", "bh1": "logrho", "bh2": "logrho"},
    },
}

# Scheduler fields sdjax does not model as ScheduleConfig fields: the values its samplers implement (other values
# are refused, by name, when the sampler's class reads the field). A field absent here and from ScheduleConfig is
# ignored (e.g. ``dynamic_thresholding_ratio``, which matters only with thresholding).
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
    "use_dynamic_shifting": (False,),
    "shift_terminal": (None,),
    "lambda_min_clipped": (-math.inf,),
    "predict_x0": (True,),
    "solver_p": (None,),
    "noise_sampler_seed": (None,),  # sdjax draws DPM++ SDE's Brownian noise from the image's seed
}
