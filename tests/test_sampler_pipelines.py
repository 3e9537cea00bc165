"""The newer samplers end to end: sdjax's images against diffusers' StableDiffusionPipeline with the matching
scheduler swapped in as users do (``Class.from_config(published_config, **options)``), both loading the same tiny
random-weight folders (``tests/reference.py``) whose scheduler config is the published SD 1.5 (epsilon) or SD 2.1
(v-prediction) file; 12 steps, negative prompts, the bar 2e-3 on [0, 1] images. Per-call options go through
``generate(scheduler_config=...)``.

A tolerance means something only where the reference agrees with itself: ``test_reference_is_stable`` (slow) runs
diffusers in float64 against float32 for every case.
"""

from __future__ import annotations

import json
import shutil

import diffusers
import numpy as np
import pytest
import torch

import sdjax
from sdjax import samplers
from tests.published import published_config
from tests.reference import NEGATIVE, PROMPTS, tiny_pipeline

ATOL = 2e-3
CASES = {  # id: (sampler, scheduler config options, steps)
    "unipc": ("unipc", {}, 12),
    "lms": ("lms", {}, 12),
    "deis": ("deis", {}, 12),
    "dpm2": ("dpm2", {}, 12),
    "dpmpp_3m": ("dpmpp_2m", {"solver_order": 3}, 12),
    "euler-trailing": ("euler", {"timestep_spacing": "trailing"}, 12),
    "dpmpp_2m-trailing": ("dpmpp_2m", {"timestep_spacing": "trailing"}, 12),
    "unipc-trailing": ("unipc", {"timestep_spacing": "trailing"}, 12),
    "tcd-4": ("tcd", {}, 4),
    "lcm-1": ("lcm", {}, 1),
    "dpm2-karras": ("dpm2", {"use_karras_sigmas": True}, 12),
    "unipc-karras-3": ("unipc", {"use_karras_sigmas": True, "solver_order": 3}, 12),
}
# The default suite runs one case per sampler, on one family (alternating); the slow set runs all, on both.
DEFAULT_CASES = ["unipc-trailing", "lms", "deis", "dpm2", "dpmpp_3m", "tcd-4", "lcm-1"]
DEFAULT = {case: ("sd15", "sd21")[i % 2] for i, case in enumerate(DEFAULT_CASES)}


@pytest.fixture(scope="module", params=["sd15", "sd21"])
def family(request, tmp_path_factory, tiny_model):
    """(name, diffusers pipeline, sdjax pipeline) of a tiny model saved with the published scheduler config."""
    folder = tmp_path_factory.mktemp(f"tiny_{request.param}") / "model"
    if request.param == "sd15":
        shutil.copytree(tiny_model, folder)
    else:
        tiny_pipeline(folder, sd2=True, prediction_type="v_prediction")
    config = {"_class_name": "PNDMScheduler" if request.param == "sd15" else "DDIMScheduler"}
    config |= published_config(request.param, "scheduler")
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    torch_pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    torch_pipe.set_progress_bar_config(disable=True)
    return request.param, torch_pipe, sdjax.StableDiffusion.from_pretrained(folder)


def _noise() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)


def diffusers_images(torch_pipe, sampler: str, options: dict, steps: int, dtype=torch.float32) -> np.ndarray:
    record = samplers.REGISTRY[sampler]
    published = torch_pipe.scheduler
    scheduler = getattr(diffusers, record.scheduler_class).from_config(
        published.config, **options, **dict(record.pinned)
    )
    torch_pipe.scheduler = scheduler
    torch_pipe.to(dtype)
    try:
        with torch.no_grad():
            return torch_pipe(
                PROMPTS,
                negative_prompt=NEGATIVE,
                num_inference_steps=steps,
                guidance_scale=7.5,
                latents=torch.from_numpy(_noise().transpose(0, 3, 1, 2).copy()).to(dtype),
                output_type="np",
            ).images.astype(np.float32)
    finally:
        torch_pipe.scheduler = published
        torch_pipe.to(torch.float32)


def _cases():
    for case in CASES:
        for name in ("sd15", "sd21"):
            marks = [] if DEFAULT.get(case) == name else [pytest.mark.slow]
            yield pytest.param(name, case, id=f"{name}-{case}", marks=marks)


@pytest.mark.parametrize("family, case", list(_cases()), indirect=["family"])
def test_images_match_diffusers(family, case):
    name, torch_pipe, pipe = family
    sampler, options, steps = CASES[case]
    expected = diffusers_images(torch_pipe, sampler, options, steps)
    images = pipe.generate(
        PROMPTS,
        NEGATIVE,
        num_inference_steps=steps,
        sampler=sampler,
        latents=_noise(),
        scheduler_config=options or None,
    )
    error = float(np.abs(images - expected).max())
    print(f"{name} {case}: max|sdjax - diffusers| = {error:.2e}")
    assert error <= ATOL


@pytest.mark.slow
@pytest.mark.parametrize("family, case", [(f, c) for f in ("sd15", "sd21") for c in CASES], indirect=["family"])
def test_reference_is_stable(family, case):
    """diffusers in float64 against float32: the 2e-3 bar is far above the reference's own rounding noise."""
    name, torch_pipe, _ = family
    sampler, options, steps = CASES[case]
    f32 = diffusers_images(torch_pipe, sampler, options, steps)
    f64 = diffusers_images(torch_pipe, sampler, options, steps, torch.float64)
    error = float(np.abs(f32 - f64).max())
    print(f"{name} {case}: max|float32 - float64| = {error:.2e}")
    assert error <= ATOL / 10
