"""LoRA loading against diffusers' ``load_lora_weights`` + ``set_adapters`` on the same files (tiny SD 1.x model).

The LoRAs are made with PEFT on the reference model (attention, feed-forward, 1x1 proj and 3x3 ResNet convs, and
the text encoder's q/k/v/out/fc layers), their factors enlarged so that their effect on the image is large, and
written as a diffusers/PEFT file and as a kohya file (``.alpha`` != rank).
"""

from __future__ import annotations

import copy
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import sdjax
from sdjax.errors import PipelineError
from sdjax.loading import lora
from tests.reference import NEGATIVE, PROMPTS

jax.config.update("jax_default_matmul_precision", "highest")

STEPS, GUIDANCE = 4, 7.5
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"]
UNET_TARGETS += ["conv1", "conv2"]  # the ResNets' 3x3 convs (LoCon)
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
# kohya file: rank 8 everywhere, alpha 4 (scale 0.5) except one layer.
KOHYA_RANK, KOHYA_ALPHA = 8, 4.0
# LDM names (kohya's SDXL spelling) of some of the tiny UNet's layers, written out by hand.
LDM_NAMES = {
    "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": "input_blocks_1_1_transformer_blocks_0_attn1_to_q",
    "down_blocks_0_resnets_0_conv1": "input_blocks_1_0_in_layers_2",
    "mid_block_attentions_0_proj_in": "middle_block_1_proj_in",
    "up_blocks_1_attentions_1_proj_out": "output_blocks_3_1_proj_out",
    "up_blocks_1_resnets_0_conv2": "output_blocks_2_0_out_layers_3",
}


def _allow_peft_0_21() -> None:
    """transformers 5.24 asks for peft >= 0.22 (unreleased; PyPI has 0.21.2) before adding adapters to the text
    encoder, though 0.21 loads them correctly (checked: the loaded factors equal the file's)."""
    import transformers.integrations.peft as transformers_peft

    transformers_peft.check_peft_version = lambda **kwargs: None


def _peft_lora(torch_pipe, seed: int, rank: int, unet_alpha: float, text_alpha: float, gain: float):
    """(unet state, text encoder state, unet config, text config): PEFT LoRA factors (PEFT names, torch tensors)
    with lora_B enlarged so that the LoRA changes the images a lot."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    out = []
    for model, targets, alpha in (
        (torch_pipe.unet, UNET_TARGETS, unet_alpha),
        (torch_pipe.text_encoder, TEXT_TARGETS, text_alpha),
    ):
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
        model = inject_adapter_in_model(config, copy.deepcopy(model))
        state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
        for k in state:
            state[k] *= gain if "lora_B" in k else 1.0
        out += [state, config]
    return out[0], out[2], out[1], out[3]


def _to_kohya(unet: dict, text: dict, alpha: float) -> dict[str, np.ndarray]:
    """PEFT-named factors -> kohya names (lora_unet_/lora_te_, "_"-flattened, lora_down/lora_up, .alpha)."""
    out = {}
    for prefix, state in (("lora_unet_", unet), ("lora_te_text_model_", text)):
        for key, value in state.items():
            module, role = key.rsplit(".lora_", 1)
            name = prefix + module.replace(".", "_")
            out[f"{name}.{'lora_down' if role.startswith('A') else 'lora_up'}.weight"] = value.numpy()
            out[f"{name}.alpha"] = np.asarray(alpha if "ff_net_2" not in name else 2.0 * alpha, np.float32)
    return out


@pytest.fixture(scope="module")
def lora_files(tiny_torch_pipe, tmp_path_factory) -> dict[str, Path]:
    """{"peft": diffusers/PEFT file with lora_adapter_metadata, "kohya": kohya file, "kohya_ldm": the kohya file
    with some UNet layers under LDM names, "old": the PEFT LoRA under diffusers' pre-PEFT names}."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    folder = tmp_path_factory.mktemp("loras")
    unet, text, unet_config, text_config = _peft_lora(tiny_torch_pipe, 1, rank=4, unet_alpha=8, text_alpha=2, gain=1)
    StableDiffusionPipeline.save_lora_weights(
        folder / "peft",
        unet_lora_layers=unet,
        text_encoder_lora_layers=text,
        unet_lora_adapter_metadata=unet_config.to_dict(),
        text_encoder_lora_adapter_metadata=text_config.to_dict(),
        safe_serialization=True,
    )
    old = {f"unet.{k}": v.numpy() for k, v in convert_state_dict_to_diffusers(unet).items()}
    old |= {f"text_encoder.{k}": v.numpy() for k, v in convert_state_dict_to_diffusers(text).items()}
    save_file(old, folder / "old.safetensors")
    unet, text, _, _ = _peft_lora(tiny_torch_pipe, seed=2, rank=KOHYA_RANK, unet_alpha=1, text_alpha=1, gain=3.0)
    kohya = _to_kohya(unet, text, KOHYA_ALPHA)
    save_file(kohya, folder / "kohya.safetensors")
    ldm = {}
    for key, value in kohya.items():
        name, _, rest = key.partition(".")
        ldm["lora_unet_" + LDM_NAMES.get(name[len("lora_unet_") :], name[len("lora_unet_") :]) + "." + rest
            if name.startswith("lora_unet_") else key] = value  # fmt: skip
    save_file(ldm, folder / "kohya_ldm.safetensors")
    return {
        "peft": folder / "peft" / "pytorch_lora_weights.safetensors",
        "kohya": folder / "kohya.safetensors",
        "kohya_ldm": folder / "kohya_ldm.safetensors",
        "old": folder / "old.safetensors",
    }


@pytest.fixture(scope="module")
def latents() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)


@pytest.fixture(scope="module")
def reference(tiny_torch_pipe, lora_files, latents):
    """diffusers with both LoRAs loaded from disk (adapters "kohya", "peft"): images per (adapters, weights)."""
    _allow_peft_0_21()
    torch_pipe = copy.deepcopy(tiny_torch_pipe)
    torch_pipe.load_lora_weights(lora_files["kohya"], adapter_name="kohya")
    torch_pipe.load_lora_weights(lora_files["peft"], adapter_name="peft")
    cache = {}

    def images(names: tuple[str, ...], weights: tuple[float, ...]) -> np.ndarray:
        if (names, weights) not in cache:
            torch_pipe.set_adapters(list(names), list(weights))
            with torch.no_grad():
                cache[(names, weights)] = torch_pipe(
                    PROMPTS,
                    negative_prompt=NEGATIVE,
                    num_inference_steps=STEPS,
                    guidance_scale=GUIDANCE,
                    latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()),
                    output_type="np",
                ).images
        return cache[(names, weights)]

    return images


@pytest.fixture(scope="module")
def pipe(tiny_model):
    """An sdjax pipeline of its own (the session's tiny_pipe must not change), with the original images."""
    return sdjax.StableDiffusion.from_pretrained(tiny_model)


def _generate(pipe, latents) -> np.ndarray:
    return pipe.generate(
        PROMPTS, NEGATIVE, num_inference_steps=STEPS, guidance_scale=GUIDANCE, sampler="ddim", latents=latents
    )


@pytest.fixture(scope="module")
def original_images(pipe, latents) -> np.ndarray:
    return _generate(pipe, latents)


@pytest.mark.parametrize("file", ["kohya", "peft"])
@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_images_match_diffusers(pipe, lora_files, reference, latents, original_images, file, scale):
    pipe.unload_lora_weights()
    pipe.load_lora_weights(lora_files[file], scale=scale, adapter_name=file)
    images = _generate(pipe, latents)
    expected = reference((file,), (scale,))
    error, effect = np.abs(images - expected).max(), np.abs(images - original_images).max()
    print(f"{file} @ {scale}: max|sdjax - diffusers| = {error:.2e}, LoRA effect {effect:.3f}")
    assert error <= 2e-3
    assert effect > 0.05  # a LoRA that changed nothing would pass the parity check


def test_two_loras_with_their_own_weights_match_diffusers(pipe, lora_files, reference, latents, original_images):
    pipe.unload_lora_weights()
    pipe.load_lora_weights(lora_files["kohya"], adapter_name="kohya")
    pipe.load_lora_weights(lora_files["peft"], adapter_name="peft")
    assert pipe.active_adapters == {"peft": 1.0}  # as diffusers: the last one loaded is the active one
    pipe.set_adapters(["kohya", "peft"], [1.0, 0.6])
    images = _generate(pipe, latents)
    error = np.abs(images - reference(("kohya", "peft"), (1.0, 0.6))).max()
    print(f"kohya @ 1.0 + peft @ 0.6: max|sdjax - diffusers| = {error:.2e}")
    assert error <= 2e-3
    assert np.abs(images - _generate_with(pipe, latents, ["kohya"], [1.0])).max() > 0.05


@pytest.mark.parametrize("file", ["kohya", "peft"])
def test_text_encoder_lora_matches_diffusers(pipe, tiny_torch_pipe, lora_files, file):
    _allow_peft_0_21()
    torch_pipe = copy.deepcopy(tiny_torch_pipe)
    torch_pipe.load_lora_weights(lora_files[file])
    with torch.no_grad():
        expected = torch_pipe.encode_prompt(PROMPTS, "cpu", 1, False)[0].numpy()
    pipe.unload_lora_weights()
    original = np.asarray(pipe.encode_prompt(PROMPTS))
    pipe.load_lora_weights(lora_files[file])
    embeddings = np.asarray(pipe.encode_prompt(PROMPTS))
    pipe.unload_lora_weights()
    assert np.abs(embeddings - expected).max() <= 1e-4
    assert np.abs(embeddings - original).max() > 0.1


def _generate_with(pipe, latents, names, weights) -> np.ndarray:
    pipe.set_adapters(names, weights)
    return _generate(pipe, latents)


def test_unload_restores_original_params_and_images(pipe, lora_files, latents, original_images):
    pipe.unload_lora_weights()
    before = pipe.params
    pipe.load_lora_weights(lora_files["kohya"])
    pipe.load_lora_weights(lora_files["peft"])
    pipe.set_adapters(["default_0", "default_1"], [0.3, 1.0])
    pipe.unload_lora_weights()
    assert all(pipe.params[c] is before[c] for c in before) and not pipe.active_adapters
    np.testing.assert_array_equal(_generate(pipe, latents), original_images)


def test_changing_weights_reuses_compiled_sampler(pipe, lora_files, latents):
    from sdjax import denoise

    pipe.unload_lora_weights()
    pipe.load_lora_weights(lora_files["kohya"], adapter_name="k")
    first = _generate(pipe, latents)
    traces = denoise.TRACE_COUNT
    pipe.set_adapters("k", 0.5)
    second = _generate(pipe, latents)
    assert denoise.TRACE_COUNT == traces and pipe.last_timings["compile_s"] == 0.0
    assert not np.allclose(first, second)
    pipe.unload_lora_weights()


def _layers(adapter: lora.LoraAdapter) -> dict:
    return {(layer.component, layer.path): layer for layer in adapter.layers}


def test_ldm_named_kohya_keys_load_as_diffusers_named(pipe, lora_files):
    named, ldm = (lora.read_adapter(lora_files[f], f, pipe.modules, pipe.params) for f in ("kohya", "kohya_ldm"))
    assert _layers(named).keys() == _layers(ldm).keys()
    for key, layer in _layers(named).items():
        np.testing.assert_array_equal(layer.down, _layers(ldm)[key].down)
        assert layer.scale == _layers(ldm)[key].scale


def test_pre_peft_diffusers_names_load_as_peft_names(pipe, lora_files):
    peft, old = (lora.read_adapter(lora_files[f], f, pipe.modules, pipe.params) for f in ("peft", "old"))
    assert _layers(peft).keys() == _layers(old).keys() and len(peft.layers) > 50
    for key, layer in _layers(peft).items():
        np.testing.assert_array_equal(layer.up, _layers(old)[key].up)
        assert _layers(old)[key].scale == 1.0  # no alpha stored: alpha = rank, as diffusers
        assert layer.scale == (8 / 4 if key[0] == "unet" else 2 / 4)  # lora_alpha / r from the file's metadata


def test_kohya_alpha_over_rank_and_locon_conv_shapes(pipe, lora_files):
    layers = _layers(lora.read_adapter(lora_files["kohya"], "k", pipe.modules, pipe.params))
    conv = layers[("unet", ("down_blocks_0", "resnets_0", "conv1", "kernel"))]
    assert conv.down.shape == (KOHYA_RANK, 32, 3, 3) and conv.up.shape == (32, KOHYA_RANK)
    ff = ("unet", ("mid_block", "attentions_0", "transformer_blocks_0", "ff", "net_2", "kernel"))
    assert layers[ff].scale == 2 * KOHYA_ALPHA / KOHYA_RANK
    assert layers[("text_encoder", ("encoder", "layers_1", "mlp", "fc1", "kernel"))].scale == KOHYA_ALPHA / KOHYA_RANK


# ----------------------------------------------------------------------------------------------- bad files


def _edited(state: dict, edit: str) -> dict:
    state = dict(state)
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    k2 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    if edit == "unknown":
        state["lora_unet_down_blocks_0_nothing_here.lora_down.weight"] = state[f"{q}.lora_down.weight"]
        state["lora_unet_down_blocks_0_nothing_here.lora_up.weight"] = state[f"{q}.lora_up.weight"]
    elif edit == "sdxl_te2":
        for key in [k for k in state if k.startswith("lora_te_")]:
            state[key.replace("lora_te_", "lora_te2_")] = state[key]
    elif edit == "sdxl_width":
        for key in [k for k in state if "attn2_to_k" in k or "attn2_to_v" in k]:
            if key.endswith("lora_down.weight"):
                state[key] = np.zeros((KOHYA_RANK, 2048), np.float32)
    elif edit == "rank":
        state[f"{q}.lora_up.weight"] = np.zeros((32, KOHYA_RANK + 1), np.float32)
    elif edit == "shape":
        state[f"{k2}.lora_up.weight"] = np.zeros((48, KOHYA_RANK), np.float32)
    elif edit == "nan":
        state[f"{q}.lora_down.weight"] = np.full_like(state[f"{q}.lora_down.weight"], np.nan)
    elif edit == "dora":
        state[f"{q}.dora_scale"] = np.ones((1, 32), np.float32)
    return state


BAD_FILES = [
    # (case, file name, message)
    ("unknown", "bad.safetensors", "1 keys match no layer of this pipeline: unet:down_blocks_0_nothing_here"),
    ("sdxl_te2", "bad.safetensors", "is a SDXL LoRA for another model family: it has text_encoder_2 weights"),
    ("sdxl_width", "bad.safetensors", "cross-attention context is 2048 (SDXL) wide, this pipeline's UNet takes 64"),
    ("rank", "bad.safetensors", "rank or shape that does not fit the model"),
    ("shape", "bad.safetensors", "rank or shape that does not fit the model: unet:down_blocks_0_attentions_0_trans"),
    ("nan", "bad.safetensors", "hold NaN or inf values"),
    ("dora", "bad.safetensors", "LoRA variant keys (dora_scale) are not supported, only LoRA"),
    ("pickle", "lora.ckpt", "is a PyTorch pickle (.ckpt); sdjax does not unpickle files"),
    ("pickle", "lora.pt", "convert it to .safetensors"),
    ("pickle", "lora.bin", "convert it to .safetensors"),
    ("pickle", "lora.pth", "convert it to .safetensors"),
    ("missing", "absent.safetensors", "does not exist"),
    ("duplicate", "kohya.safetensors", "a LoRA named 'kept' is already loaded"),
]


@pytest.mark.parametrize("case, name, message", BAD_FILES, ids=[f"{c}-{n}" for c, n, _ in BAD_FILES])
def test_bad_lora_is_one_line_and_changes_nothing(pipe, lora_files, tmp_path, case, name, message):
    pipe.unload_lora_weights()
    pipe.load_lora_weights(lora_files["kohya"], adapter_name="kept", scale=0.5)
    params, state = pipe.params, pipe._lora
    path = tmp_path / name
    if case == "pickle":
        path.write_bytes(b"\x80\x04not read")
    elif case == "duplicate":
        path = lora_files["kohya"]
    elif case != "missing":
        save_file(_edited(load_file(lora_files["kohya"]), case), path)
    with pytest.raises(PipelineError, match=None) as error:
        pipe.load_lora_weights(path, adapter_name="kept" if case == "duplicate" else "new")
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)
    assert pipe.params is params and pipe._lora is state and pipe.active_adapters == {"kept": 0.5}
    pipe.unload_lora_weights()
