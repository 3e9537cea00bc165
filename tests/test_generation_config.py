"""A model folder's recommended generation settings (generation_config.json): loaded, used as generate()'s
defaults, kept by save_pretrained and by training, and refused in one line when malformed."""

from __future__ import annotations

import dataclasses
import json
import shutil

import ml_collections
import numpy as np
import pytest

import sdjax
from sdjax.errors import PipelineError
from sdjax.loading import generation_config
from sdjax.train import diffusion_stage
from tests.reference import PROMPTS

SETTINGS = {"sampler": "euler_ancestral", "guidance_scale": 3.0}
KWARGS = dict(num_inference_steps=4, seed=1, height=16, width=16)


@pytest.fixture(scope="module")
def recommended(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("recommended") / "model"
    shutil.copytree(tiny_model, folder)
    (folder / generation_config.FILENAME).write_text(json.dumps(SETTINGS))
    return folder


def test_a_folder_without_the_file_keeps_the_family_defaults(tiny_pipe):
    assert tiny_pipe.generation_defaults == {}
    assert (tiny_pipe.default_sampler, tiny_pipe.default_guidance_scale) == ("ddim", 7.5)


def test_a_folder_with_the_file_recommends_its_sampler_and_guidance(recommended):
    pipe = sdjax.StableDiffusion.from_pretrained(recommended)
    assert pipe.generation_defaults == SETTINGS
    assert (pipe.default_sampler, pipe.default_guidance_scale) == ("euler_ancestral", 3.0)


def test_generate_uses_the_recommended_sampler_and_guidance(tiny_pipe):
    # The tiny pipeline with recommendations (sharing its compiled programs): generate() without sampler and
    # guidance runs theirs, not ddim and 7.5.
    pipe = dataclasses.replace(tiny_pipe, generation_defaults=SETTINGS)
    by_default = pipe.generate(PROMPTS, **KWARGS)
    explicit = tiny_pipe.generate(PROMPTS, sampler="euler_ancestral", guidance_scale=3.0, **KWARGS)
    np.testing.assert_array_equal(by_default, explicit)
    assert np.abs(by_default - tiny_pipe.generate(PROMPTS, **KWARGS)).max() > 1e-3


def test_save_pretrained_keeps_the_file_and_diffusers_still_loads_the_folder(recommended, tmp_path):
    from diffusers import StableDiffusionPipeline

    sdjax.StableDiffusion.from_pretrained(recommended).save_pretrained(tmp_path / "copy")
    assert json.loads((tmp_path / "copy" / generation_config.FILENAME).read_text()) == SETTINGS
    StableDiffusionPipeline.from_pretrained(tmp_path / "copy")  # the extra file is not a component


def test_a_training_configs_generation_settings_are_checked(tmp_path):
    config = ml_collections.ConfigDict({"generation": dict(SETTINGS), "pretrained_path": None})
    assert diffusion_stage._generation_settings(config) == SETTINGS
    config.generation = {"sampler": "no_such_sampler"}
    with pytest.raises(PipelineError, match="config.generation: unknown sampler 'no_such_sampler'; choose one of"):
        diffusion_stage._generation_settings(config)


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"sampler": "unknown"}', r"unknown sampler 'unknown'; choose one of: ddim"),
        ('{"steps": 20}', r"unknown field\(s\) steps; accepted: sampler, guidance_scale"),
        ('{"guidance_scale": -1}', r"guidance_scale must be a finite number >= 0"),
        ('{"guidance_scale": "high"}', r"guidance_scale must be a number"),
        ("[1, 2]", r"expected an object with fields sampler, guidance_scale"),
        ("{not json", r"not a readable JSON file"),
    ],
)
def test_a_malformed_file_is_one_line_naming_it(tiny_model, tmp_path, content, message):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    (folder / generation_config.FILENAME).write_text(content)
    with pytest.raises(PipelineError, match=message) as error:
        sdjax.StableDiffusion.from_pretrained(folder)
    assert str(folder / generation_config.FILENAME) in str(error.value) and "\n" not in str(error.value)
