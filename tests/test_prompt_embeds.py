"""generate(prompt_embeds=..., negative_prompt_embeds=...): text embeddings in place of prompts, as diffusers."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from sdjax.interpolation import slerp
from tests.reference import NEGATIVE, PROMPTS

jax.config.update("jax_default_matmul_precision", "highest")

STEPS, GUIDANCE = 10, 7.5


def _noise(n: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, 8, 8, 4)).astype(np.float32)


def test_embeddings_of_the_prompts_give_the_prompts_images(tiny_pipe):
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=_noise(4), num_images_per_prompt=2)
    expected = tiny_pipe.generate(PROMPTS, NEGATIVE, **kwargs)
    embeds = tiny_pipe.encode_prompt(PROMPTS)
    np.testing.assert_allclose(tiny_pipe.generate(prompt_embeds=embeds, negative_prompts=NEGATIVE, **kwargs), expected)
    negative = tiny_pipe.encode_prompt(NEGATIVE)
    both = tiny_pipe.generate(prompt_embeds=np.asarray(embeds), negative_prompt_embeds=negative, **kwargs)
    np.testing.assert_allclose(both, expected)


def test_interpolated_embeddings_match_diffusers(tiny_pipe, tiny_torch_pipe):
    """An embedding no prompt encodes to (half-way between two prompts) through both pipelines."""
    embeds = np.asarray(tiny_pipe.encode_prompt(PROMPTS))
    between = np.asarray(slerp(0.5, embeds[0], embeds[1]))[None]
    negative = np.asarray(tiny_pipe.encode_prompt(NEGATIVE[:1]))
    latents = _noise(1)
    ours = tiny_pipe.generate(
        prompt_embeds=between, negative_prompt_embeds=negative, num_inference_steps=STEPS,
        guidance_scale=GUIDANCE, latents=latents,
    )  # fmt: skip
    with torch.no_grad():
        theirs = tiny_torch_pipe(
            prompt_embeds=torch.from_numpy(between), negative_prompt_embeds=torch.from_numpy(negative),
            num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="np",
            latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()),
        ).images  # fmt: skip
    assert ours.shape == theirs.shape == (1, 16, 16, 3)
    assert np.abs(ours - theirs).max() <= 1e-4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [  # shapes with D for the text encoder's width
        ({}, "prompts must be a string or a non-empty list of strings, got None"),
        ({"prompts": "a cat", "prompt_embeds": (1, 77, "D")}, "either prompts or prompt_embeds"),
        ({"prompts": "a cat", "negative_prompt_embeds": (1, 77, "D")}, "needs prompt_embeds"),
        ({"prompt_embeds": (77, "D")}, "prompt_embeds must be finite"),
        ({"prompt_embeds": (1, 77, 7)}, "prompt_embeds must be finite"),
        ({"prompt_embeds": (1, 5, "D")}, "prompt_embeds must be finite"),
        ({"prompt_embeds": (1, 77, "D"), "negative_prompt_embeds": (2, 77, "D")}, "shape"),
    ],
)
def test_bad_embeddings_are_refused_in_one_line(tiny_pipe, kwargs, match):
    width = tiny_pipe.text_encoder.config.hidden_size
    kwargs = {
        k: v if isinstance(v, str) else np.zeros([width if d == "D" else d for d in v]) for k, v in kwargs.items()
    }
    with pytest.raises(ValueError, match=match) as error:
        tiny_pipe.generate(num_inference_steps=2, **kwargs)
    assert "\n" not in str(error.value)


def test_non_finite_embeddings_are_refused(tiny_pipe):
    embeds = np.full((1, 77, tiny_pipe.text_encoder.config.hidden_size), np.nan, np.float32)
    with pytest.raises(ValueError, match="finite"):
        tiny_pipe.generate(prompt_embeds=embeds, num_inference_steps=2)
