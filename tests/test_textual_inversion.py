"""Textual inversion against diffusers' ``load_textual_inversion`` on the same files (tiny SD 1.x model)."""

from __future__ import annotations

import copy

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import sdjax
from sdjax.errors import PipelineError

jax.config.update("jax_default_matmul_precision", "highest")

WIDTH = 64  # the tiny text encoder's hidden size
PROMPT = "a red circle and <multi> next to <single>"


def _vectors(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, WIDTH)).astype(np.float32)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(path, token to pass) per file: A1111 and diffusers layouts, one and several vectors."""
    folder = tmp_path_factory.mktemp("embeddings")
    layouts = {
        "a1111_single": ({"emb_params": _vectors(1, 0)}, "<single>"),
        "a1111_multi": ({"emb_params": _vectors(3, 1)}, "<multi>"),
        "diffusers_single": ({"<single>": _vectors(1, 2)[0]}, None),
        "diffusers_multi": ({"<multi>": _vectors(2, 3)}, None),
    }
    out = {}
    for name, (state, token) in layouts.items():
        save_file(state, folder / f"{name}.safetensors")
        out[name] = (folder / f"{name}.safetensors", token)
    return out


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return sdjax.StableDiffusion.from_pretrained(tiny_model)


def _fresh(pipe) -> sdjax.StableDiffusion:
    """A copy of ``pipe`` sharing its arrays (loading an embedding replaces them, never changes them)."""
    return copy.copy(pipe)


@pytest.mark.parametrize("single, multi", [("a1111_single", "a1111_multi"), ("diffusers_single", "diffusers_multi")])
def test_ids_and_embeddings_equal_diffusers(pipe, tiny_torch_pipe, files, single, multi):
    torch_pipe = copy.deepcopy(tiny_torch_pipe)
    mine = _fresh(pipe)
    for name in (multi, single):  # two files, one after the other
        path, token = files[name]
        torch_pipe.load_textual_inversion(str(path), token=token)
        mine.load_textual_inversion(path, token=token)
    expected_prompt = torch_pipe.maybe_convert_prompt(PROMPT, torch_pipe.tokenizer)
    assert sdjax.loading.textual_inversion.expand_prompt(mine.tokenizer, PROMPT) == expected_prompt
    assert "<multi>_1" in expected_prompt
    ids = mine.tokenizer(expected_prompt).input_ids
    assert ids == torch_pipe.tokenizer(expected_prompt).input_ids
    table = torch_pipe.text_encoder.get_input_embeddings().weight.detach().numpy()
    np.testing.assert_array_equal(
        np.asarray(mine.params["text_encoder"]["embeddings"]["token_embedding"]["embedding"]), table
    )
    assert mine.text_encoder.config.vocab_size == table.shape[0] == len(mine.tokenizer)
    with torch.no_grad():
        expected = torch_pipe.encode_prompt(PROMPT, "cpu", 1, False)[0].numpy()
    np.testing.assert_allclose(np.asarray(mine.encode_prompt([PROMPT])), expected, atol=1e-5)
    assert len(pipe.tokenizer) < len(mine.tokenizer)  # the shared pipeline's tokenizer is left alone


def test_token_in_prompt_changes_the_image(pipe, files):
    mine = _fresh(pipe)
    mine.load_textual_inversion(*files["diffusers_multi"])
    kwargs = dict(num_inference_steps=3, guidance_scale=7.5, seed=0)
    with_token = mine.generate("a red circle <multi>", **kwargs)
    without = mine.generate("a red circle", **kwargs)
    assert np.abs(with_token - without).max() > 0.05


def test_embedding_survives_lora_reweighting(pipe, files, tmp_path):
    """A LoRA re-merge starts from the params as loaded before the LoRA: they get the new rows too."""
    mine = _fresh(pipe)
    fc2 = "lora_te_text_model_encoder_layers_0_mlp_fc2"
    lora_file = {f"{fc2}.lora_down.weight": np.ones((2, 128), np.float32), f"{fc2}.lora_up.weight": np.ones((64, 2))}
    save_file({k: v.astype(np.float32) * 0.01 for k, v in lora_file.items()}, tmp_path / "lora.safetensors")
    mine.load_lora_weights(tmp_path / "lora.safetensors", adapter_name="a")
    mine.load_textual_inversion(*files["diffusers_single"])
    for step in (lambda: mine.set_adapters("a", 0.5), mine.unload_lora_weights):
        step()
        table = mine.params["text_encoder"]["embeddings"]["token_embedding"]["embedding"]
        assert table.shape[0] == len(mine.tokenizer)
        np.testing.assert_array_equal(np.asarray(table[-1]), _vectors(1, 2)[0])


BAD = [
    # (case, message)
    ("in_vocabulary", "token '<|endoftext|>' is already in the tokenizer's vocabulary"),
    ("loaded_twice", "token '<single>' is already in the tokenizer's vocabulary"),
    ("sdxl", "is an SDXL embedding (clip_g, clip_l: one part per text encoder)"),
    ("width", "embedding of shape (2, 768), this text encoder takes (n, 64) vectors"),
    ("nan", "the embedding holds NaN or inf values"),
    ("two_tensors", "holds 2 tensors (a, b); expected one embedding"),
    ("pickle", "is a PyTorch pickle (.pt); sdjax does not unpickle files"),
    ("missing", "does not exist"),
]


@pytest.mark.parametrize("case, message", BAD, ids=[c for c, _ in BAD])
def test_bad_embedding_is_one_line_and_changes_nothing(pipe, files, tmp_path, case, message):
    mine = _fresh(pipe)
    if case == "loaded_twice":
        mine.load_textual_inversion(*files["diffusers_single"])
        path = files["diffusers_single"][0]
    else:
        path = tmp_path / "emb.safetensors"
    state = {
        "in_vocabulary": {"emb_params": _vectors(1, 0)},
        "sdxl": {"clip_l": np.zeros((1, 768), np.float32), "clip_g": np.zeros((1, 1280), np.float32)},
        "width": {"<x>": np.zeros((2, 768), np.float32)},
        "nan": {"<x>": np.full((1, WIDTH), np.nan, np.float32)},
        "two_tensors": {"a": _vectors(1, 0), "b": _vectors(1, 1)},
    }.get(case)
    if state is not None:
        save_file(state, path)
    token = "<|endoftext|>" if case == "in_vocabulary" else None
    if case == "pickle":
        path = tmp_path / "emb.pt"
        path.write_bytes(b"\x80\x04not read")
    before = (mine.params, mine.text_encoder, mine.tokenizer, len(mine.tokenizer))
    with pytest.raises(PipelineError) as error:
        mine.load_textual_inversion(path, token=token)
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)
    assert (mine.params, mine.text_encoder, mine.tokenizer, len(mine.tokenizer)) == before
