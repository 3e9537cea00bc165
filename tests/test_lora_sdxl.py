"""LoRA and textual inversion on StableDiffusionXL against diffusers' ``StableDiffusionXLPipeline`` loading the same
files: a kohya SDXL LoRA (``lora_unet_`` under diffusers and under LDM names, ``lora_te1_`` / ``lora_te2_``,
``.alpha`` != rank) and an SDXL embedding (``clip_l`` / ``clip_g``)."""

from __future__ import annotations

import copy

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import sdjax
from sdjax.loading import ldm_names_xl
from tests.reference import NEGATIVE, PROMPTS
from tests.test_lora import _allow_peft_0_21

jax.config.update("jax_default_matmul_precision", "highest")

STEPS = 6
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
RANK, ALPHA = 4, 2.0  # kohya scale alpha / rank = 0.5


def _factors(model, targets, seed: int) -> dict[str, torch.Tensor]:
    """PEFT LoRA factors (PEFT names) on ``model``, lora_B enlarged so that the LoRA changes the image a lot."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    config = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=targets, init_lora_weights=False)
    state = get_peft_model_state_dict(inject_adapter_in_model(config, copy.deepcopy(model)))
    return {k: v.detach() * (3.0 if "lora_B" in k else 1.0) for k, v in state.items()}


def _kohya(prefix: str, state: dict, rename=lambda module: module) -> dict[str, np.ndarray]:
    out = {}
    for key, value in state.items():
        module, role = key.rsplit(".lora_", 1)
        name = prefix + rename(module).replace(".", "_")
        out[f"{name}.{'lora_down' if role.startswith('A') else 'lora_up'}.weight"] = value.numpy()
        out[f"{name}.alpha"] = np.asarray(ALPHA, np.float32)
    return out


@pytest.fixture(scope="module")
def files(tiny_sdxl, tmp_path_factory):
    """{"diffusers_names": kohya SDXL LoRA with diffusers module names, "ldm_names": the same LoRA with the UNet's
    layers under LDM names (kohya's own SDXL spelling)}."""
    torch_pipe, _ = tiny_sdxl
    folder = tmp_path_factory.mktemp("sdxl_loras")
    unet = _factors(torch_pipe.unet, UNET_TARGETS, 1)
    te1 = _factors(torch_pipe.text_encoder, TEXT_TARGETS, 2)
    te2 = _factors(torch_pipe.text_encoder_2, TEXT_TARGETS, 3)
    text = _kohya("lora_te1_", te1) | _kohya("lora_te2_", te2)
    names = {k: k for k in torch_pipe.unet.state_dict()}
    ldm = {v.removesuffix(".weight"): k.removesuffix(".weight") for k, v in ldm_names_xl.unet_to_ldm(names).items()}
    save_file(_kohya("lora_unet_", unet) | text, folder / "diffusers_names.safetensors")
    save_file(_kohya("lora_unet_", unet, lambda m: ldm[m]) | text, folder / "ldm_names.safetensors")
    return {name: folder / f"{name}.safetensors" for name in ("diffusers_names", "ldm_names")}


@pytest.fixture(scope="module")
def pipe(tiny_sdxl):
    return sdjax.StableDiffusionXL.from_pretrained(tiny_sdxl[1])


def _latents() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)


def _diffusers_images(torch_pipe, **kwargs) -> np.ndarray:
    latents = torch.from_numpy(np.ascontiguousarray(_latents().transpose(0, 3, 1, 2)))
    with torch.no_grad():
        return torch_pipe(
            PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=STEPS, latents=latents, output_type="np", **kwargs
        ).images


def _images(pipe, prompts=PROMPTS) -> np.ndarray:
    return pipe.generate(prompts, NEGATIVE, num_inference_steps=STEPS, latents=_latents())


@pytest.mark.parametrize("scale", [1.0, 0.6])
@pytest.mark.parametrize("name", ["diffusers_names", "ldm_names"])
def test_kohya_sdxl_lora_matches_diffusers(tiny_sdxl, files, pipe, name, scale):
    _allow_peft_0_21()
    torch_pipe = copy.deepcopy(tiny_sdxl[0])
    torch_pipe.load_lora_weights(files[name], adapter_name="x")
    torch_pipe.set_adapters(["x"], [scale])
    expected = _diffusers_images(torch_pipe)
    original = _images(pipe)
    pipe.load_lora_weights(files[name], scale=scale)
    try:
        images = _images(pipe)
    finally:
        pipe.unload_lora_weights()
    error, effect = np.abs(images - expected).max(), np.abs(images - original).max()
    print(f"sdxl kohya {name} @ {scale}: max|sdjax - diffusers| = {error:.2e}, effect {effect:.2f}")
    assert error <= 2e-3
    assert effect > 0.05  # a LoRA that changed nothing would fail here
    assert np.array_equal(_images(pipe), original)  # unloaded: the original images exactly


def test_sdxl_embedding_loads_into_both_encoders_as_diffusers(tiny_sdxl, tmp_path):
    torch_pipe, folder = tiny_sdxl
    rng = np.random.default_rng(4)
    parts = {"clip_l": rng.standard_normal((2, 64)), "clip_g": rng.standard_normal((2, 32))}
    save_file({k: v.astype(np.float32) for k, v in parts.items()}, tmp_path / "emb.safetensors")
    pipe = sdjax.StableDiffusionXL.from_pretrained(folder)
    plain = _images(pipe, ["a photo of <cat-toy>"] * 2)
    pipe.load_textual_inversion(tmp_path / "emb.safetensors", token="<cat-toy>")
    reference = copy.deepcopy(torch_pipe)
    for part, encoder, tok in (("clip_l", "text_encoder", "tokenizer"), ("clip_g", "text_encoder_2", "tokenizer_2")):
        reference.load_textual_inversion(
            torch.from_numpy(parts[part].astype(np.float32)), token="<cat-toy>",
            text_encoder=getattr(reference, encoder), tokenizer=getattr(reference, tok),
        )  # fmt: skip
        ids = reference.maybe_convert_prompt("a photo of <cat-toy>", getattr(reference, tok))
        ours = sdjax.loading.textual_inversion.expand_prompt(pipe.tokenizers[tok], "a photo of <cat-toy>")
        assert ours == ids
    latents = torch.from_numpy(np.ascontiguousarray(_latents().transpose(0, 3, 1, 2)))
    with torch.no_grad():
        expected = reference(
            ["a photo of <cat-toy>"] * 2, negative_prompt=NEGATIVE, num_inference_steps=STEPS, latents=latents,
            output_type="np",
        ).images  # fmt: skip
    images = _images(pipe, ["a photo of <cat-toy>"] * 2)
    assert np.abs(images - expected).max() <= 2e-3
    assert np.abs(images - plain).max() > 0.05


def test_sd_lora_on_sdxl_is_one_line(pipe, tiny_torch_pipe, tmp_path):
    """An SD 1.x LoRA (cross-attention width of the SD model) on SDXL: refused, nothing applied."""
    from tests.test_lora import _peft_lora, _to_kohya

    unet, text, _, _ = _peft_lora(tiny_torch_pipe, 1, rank=4, unet_alpha=4, text_alpha=4, gain=1)
    save_file(_to_kohya(unet, text, 4.0), tmp_path / "sd.safetensors")
    before = pipe.params
    with pytest.raises(sdjax.PipelineError) as info:
        pipe.load_lora_weights(tmp_path / "sd.safetensors")
    assert "\n" not in str(info.value) and pipe.params is before
    print(info.value)
