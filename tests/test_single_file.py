"""Single-file (original LDM / CompVis) checkpoints: naming checked against diffusers' own single-file loader,
exact round trips, flax parity with the PyTorch networks, configs inferred from shapes, clear rejections."""

import dataclasses
import functools
import re
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from diffusers import UNet2DConditionModel as TorchUNet
from diffusers.loaders import single_file_utils
from safetensors.numpy import save_file
from transformers import CLIPTextConfig as TorchCLIPTextConfig
from transformers import CLIPTextModel as TorchCLIPTextModel

from sdjax import weights
from sdjax.loading.ldm_names import diffusers_to_ldm, ldm_to_diffusers
from sdjax.loading.single_file import infer_configs, load_single_file
from sdjax.weights import WeightsError

jax.config.update("jax_default_matmul_precision", "highest")

# Tiny networks with SD structure that the LDM format and the config inference can express: norms of 32 groups,
# 8 heads in SD 1, 64-dim heads in SD 2 and in the text encoder, two ResNets per block, a DownBlock2D last.
UNET_SD1 = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=128,
    attention_head_dim=8,
    norm_num_groups=32,
)
UNET_SD2 = {**UNET_SD1, "block_out_channels": (64, 128), "attention_head_dim": (1, 2), "use_linear_projection": True,
            "upcast_attention": True}  # fmt: skip
VAE = dict(
    sample_size=16,
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
)
TEXT = dict(
    vocab_size=1000,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=77,
    bos_token_id=998,
    eos_token_id=999,
    pad_token_id=0,
)
VARIANTS = {
    "sd1": (UNET_SD1, {**TEXT, "hidden_act": "quick_gelu"}, "epsilon"),
    "sd2": (UNET_SD2, {**TEXT, "hidden_act": "gelu"}, "v_prediction"),
}

# The published SD 1.5 and SD 2.1 (768-v) configs, for the full-size shape-only checks.
SD15 = {
    "unet": dict(
        sample_size=64,
        block_out_channels=[320, 640, 1280, 1280],
        down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
        use_linear_projection=False,
        upcast_attention=False,
        in_channels=4,
    ),
    "vae": dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, sample_size=512,
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4),
    "text_encoder": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu"),
}  # fmt: skip
SD21_768_V = {
    "unet": {**SD15["unet"], "sample_size": 96, "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20],
             "use_linear_projection": True, "upcast_attention": True},
    "vae": {**SD15["vae"], "sample_size": 768},
    "text_encoder": {**SD15["text_encoder"], "hidden_size": 1024, "intermediate_size": 4096,
                     "num_hidden_layers": 23, "num_attention_heads": 16, "hidden_act": "gelu"},
}  # fmt: skip


@dataclasses.dataclass
class Reference:
    file: Path
    folder: Path  # diffusers-style folder with the tiny unet/ vae/ text_encoder/ configs
    components: dict  # diffusers / transformers state dicts as numpy
    torch: dict  # the PyTorch networks
    inputs: dict
    outputs: dict  # the PyTorch networks' outputs on `inputs`, NHWC
    prediction_type: str


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).permute(0, 3, 1, 2)


def _nhwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).numpy()


def _inputs(text_config: dict) -> dict:
    rng = np.random.default_rng(0)
    return {
        "sample": rng.standard_normal((2, 8, 8, 4), dtype=np.float32),
        "timesteps": np.array([999, 13]),
        "context": rng.standard_normal((2, 7, text_config["hidden_size"]), dtype=np.float32),
        "images": rng.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32),
        "latents": rng.standard_normal((2, 4, 4, 4), dtype=np.float32),
        "input_ids": rng.integers(0, text_config["vocab_size"], (2, 7)),
    }


def _torch_unet(unet: TorchUNet, x: dict) -> np.ndarray:
    with torch.no_grad():
        out = unet(_nchw(x["sample"]), torch.from_numpy(x["timesteps"]), torch.from_numpy(x["context"])).sample
    return _nhwc(out)


def _torch_vae(vae: TorchAutoencoderKL, x: dict) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        mean = vae.encode(_nchw(x["images"])).latent_dist.mean
        decoded = vae.decode(_nchw(x["latents"])).sample
    return _nhwc(mean), _nhwc(decoded)


def _torch_text(text_encoder: TorchCLIPTextModel, x: dict) -> np.ndarray:
    with torch.no_grad():
        return text_encoder(torch.from_numpy(x["input_ids"])).last_hidden_state.numpy()


def _torch_outputs(nets: dict, x: dict) -> dict:
    mean, decoded = _torch_vae(nets["vae"], x)
    return {
        "unet": _torch_unet(nets["unet"], x),
        "vae_mean": mean,
        "vae_decode": decoded,
        "text_encoder": _torch_text(nets["text_encoder"], x),
    }


def _build_reference(variant: str, folder: Path) -> Reference:
    unet_config, text_config, prediction_type = VARIANTS[variant]
    nets = {
        "unet": _perturbed(TorchUNet(**unet_config), seed=0),
        "vae": _perturbed(TorchAutoencoderKL(**VAE), seed=1),
        "text_encoder": _perturbed(TorchCLIPTextModel(TorchCLIPTextConfig(**text_config)), seed=2),
    }
    for name, net in nets.items():
        (net.save_config if name != "text_encoder" else net.config.save_pretrained)(folder / name)
    components = {name: {k: v.numpy() for k, v in net.state_dict().items()} for name, net in nets.items()}
    file = folder / f"{variant}.safetensors"
    save_file(diffusers_to_ldm(components), str(file))
    inputs = _inputs(text_config)
    return Reference(file, folder, components, nets, inputs, _torch_outputs(nets, inputs), prediction_type)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """variant -> Reference, each built once per module."""
    return functools.cache(lambda variant: _build_reference(variant, tmp_path_factory.mktemp(variant)))


@pytest.fixture(scope="module", params=list(VARIANTS))
def reference(request, references) -> Reference:
    return references(request.param)


def _relative_error(ours, reference) -> float:
    reference = np.asarray(reference, np.float64)
    return float(np.abs(np.asarray(ours, np.float64) - reference).max() / np.abs(reference).max())


def _ldm_state(reference: Reference) -> dict:
    return weights.read_safetensors([reference.file])


def _with_text_model_prefix(components: dict) -> dict:
    text = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in components["text_encoder"].items()}
    return {**components, "text_encoder": text}


def _assert_same_state(ours: dict, expected: dict) -> None:
    assert sorted(ours) == sorted(expected)
    for key in expected:
        np.testing.assert_array_equal(ours[key], expected[key], err_msg=key)


# --- the LDM names, checked by diffusers' own converter


def test_diffusers_single_file_loader_reads_our_unet(reference):
    unet = TorchUNet.from_single_file(
        str(reference.file), config=str(reference.folder), subfolder="unet", local_files_only=True
    )
    np.testing.assert_array_equal(_torch_unet(unet, reference.inputs), reference.outputs["unet"])


def test_diffusers_single_file_loader_reads_our_vae(reference):
    vae = TorchAutoencoderKL.from_single_file(
        str(reference.file), config=str(reference.folder), subfolder="vae", local_files_only=True
    )
    mean, decoded = _torch_vae(vae, reference.inputs)
    np.testing.assert_array_equal(mean, reference.outputs["vae_mean"])
    np.testing.assert_array_equal(decoded, reference.outputs["vae_decode"])


def test_diffusers_single_file_loader_reads_our_text_encoder(reference):
    checkpoint = {k: torch.from_numpy(v) for k, v in _ldm_state(reference).items()}
    text_encoder = single_file_utils.create_diffusers_clip_model_from_ldm(
        TorchCLIPTextModel, checkpoint, config=str(reference.folder), subfolder="text_encoder", local_files_only=True
    )
    np.testing.assert_array_equal(_torch_text(text_encoder, reference.inputs), reference.outputs["text_encoder"])


def test_sd1_text_encoder_is_written_as_hf_clip(references):
    reference = references("sd1")
    keys = set(_ldm_state(reference))
    assert "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in keys
    assert not any(k.startswith("cond_stage_model.model.") for k in keys)


def test_sd2_text_encoder_is_written_as_open_clip_with_an_identity_last_layer(references):
    reference = references("sd2")
    state = _ldm_state(reference)
    assert not any(k.startswith("cond_stage_model.transformer.") for k in state)
    last = [v for k, v in state.items() if k.startswith("cond_stage_model.model.transformer.resblocks.2.")]
    assert len(last) == 12 and all(not v.any() for v in last)
    assert "cond_stage_model.model.transformer.resblocks.3.ln_1.weight" not in state


# --- round trips


def test_ldm_to_diffusers_inverts_diffusers_to_ldm(reference):
    expected = _with_text_model_prefix(reference.components)
    back = ldm_to_diffusers(diffusers_to_ldm(reference.components))
    assert sorted(back) == ["text_encoder", "unet", "vae"]
    for name in expected:
        _assert_same_state(back[name], expected[name])


def test_diffusers_to_ldm_inverts_ldm_to_diffusers(reference):
    state = _ldm_state(reference)
    _assert_same_state(diffusers_to_ldm(ldm_to_diffusers(state)), state)


def test_schedule_buffers_and_ema_copies_are_ignored(reference):
    state = _ldm_state(reference)
    extra = {"alphas_cumprod": np.ones(1000, np.float32), "model_ema.decay": np.float32(0.9999),
             "first_stage_model.loss.logvar": np.zeros((), np.float32)}  # fmt: skip
    converted = ldm_to_diffusers({**state, **extra})
    _assert_same_state(converted["unet"], ldm_to_diffusers(state)["unet"])
    assert "loss.logvar" not in converted["vae"]


def test_sd1_text_encoder_without_text_model_level_is_read(references):
    reference = references("sd1")
    state = _ldm_state(reference)
    old = "cond_stage_model.transformer.text_model."
    legacy = {k.replace(old, "cond_stage_model.transformer."): v for k, v in state.items()}
    _assert_same_state(ldm_to_diffusers(legacy)["text_encoder"], ldm_to_diffusers(state)["text_encoder"])


# --- flax parity


@pytest.fixture(scope="module")
def loaded(reference):
    return load_single_file(reference.file, prediction_type=reference.prediction_type)


def test_load_single_file_unet_matches_torch(reference, loaded):
    modules, params, _ = loaded
    x = reference.inputs
    ours = jax.jit(modules["unet"].apply)({"params": params["unet"]}, x["sample"], x["timesteps"], x["context"])
    error = _relative_error(ours, reference.outputs["unet"])
    print(f"single-file UNet parity: max rel error {error:.2e}")
    assert error <= 1e-4


def test_load_single_file_vae_matches_torch(reference, loaded):
    modules, params, _ = loaded
    vae, variables = modules["vae"], {"params": params["vae"]}
    mean = jax.jit(lambda v, x: vae.apply(v, x, method=vae.encode).mean)(variables, reference.inputs["images"])
    decoded = jax.jit(lambda v, z: vae.apply(v, z, method=vae.decode))(variables, reference.inputs["latents"])
    errors = (
        _relative_error(mean, reference.outputs["vae_mean"]),
        _relative_error(decoded, reference.outputs["vae_decode"]),
    )
    print(f"single-file VAE parity: encode mean {errors[0]:.2e}, decode {errors[1]:.2e}")
    assert max(errors) <= 1e-4


def test_load_single_file_text_encoder_matches_torch(reference, loaded):
    modules, params, _ = loaded
    ours = modules["text_encoder"].apply({"params": params["text_encoder"]}, reference.inputs["input_ids"])
    error = _relative_error(ours, reference.outputs["text_encoder"])
    print(f"single-file text encoder parity: max rel error {error:.2e}")
    assert error <= 1e-4


def test_load_single_file_scheduler_config_carries_prediction_type(reference, loaded):
    assert loaded[2]["prediction_type"] == reference.prediction_type
    assert loaded[2]["beta_schedule"] == "scaled_linear"


# --- configs


def test_infer_configs_recovers_the_tiny_configs(reference):
    configs = infer_configs(_ldm_state(reference), reference.prediction_type)
    for name in ("unet", "vae"):
        original = reference.torch[name].config
        for key, value in configs[name].items():
            if not key.startswith("_") and key != "sample_size":
                expected = list(original[key]) if isinstance(original[key], tuple) else original[key]
                assert value == expected, f"{name}.{key}"
    original = reference.torch["text_encoder"].config
    for key, value in configs["text_encoder"].items():
        if key not in ("architectures", "model_type", "projection_dim"):
            assert value == getattr(original, key), f"text_encoder.{key}"


FULL_SIZE = {"sd15": (SD15, "epsilon"), "sd21_768_v": (SD21_768_V, "v_prediction")}


@dataclasses.dataclass
class FullSize:
    expected: dict  # the published config fields
    prediction_type: str
    nets: dict  # PyTorch networks on the meta device
    components: dict  # their state dicts as zero-stride numpy arrays: real key sets and shapes, no memory
    state: dict  # diffusers_to_ldm(components)


def _meta_nets(expected: dict) -> dict:
    with torch.device("meta"):
        return {
            "unet": TorchUNet(**{k: v for k, v in expected["unet"].items() if k != "sample_size"}),
            "vae": TorchAutoencoderKL(**{k: v for k, v in expected["vae"].items() if k != "sample_size"}),
            "text_encoder": TorchCLIPTextModel(TorchCLIPTextConfig(**expected["text_encoder"])),
        }


def _shape_only(net: torch.nn.Module) -> dict:
    return {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in net.state_dict().items()}


def _build_full_size(variant: str) -> FullSize:
    expected, prediction_type = FULL_SIZE[variant]
    nets = _meta_nets(expected)
    components = {name: _shape_only(net) for name, net in nets.items()}
    return FullSize(expected, prediction_type, nets, components, diffusers_to_ldm(components))


@pytest.fixture(scope="module")
def full_sizes():
    return functools.cache(_build_full_size)


@pytest.fixture(scope="module", params=list(FULL_SIZE))
def full_size(request, full_sizes) -> FullSize:
    return full_sizes(request.param)


def test_infer_configs_of_full_size_checkpoints(full_size):
    configs = infer_configs(full_size.state, full_size.prediction_type)
    for name, fields in full_size.expected.items():
        assert {k: configs[name][k] for k in fields} == fields, name
    assert configs["scheduler"]["prediction_type"] == full_size.prediction_type


def test_full_size_ldm_names_match_diffusers_converters(full_size):
    """diffusers' converters, run on shape-only tensors, map our LDM names back onto the diffusers state dicts."""
    checkpoint = {k: torch.empty(v.shape, device="meta") for k, v in full_size.state.items()}
    converted = {
        "unet": single_file_utils.convert_ldm_unet_checkpoint(checkpoint, full_size.nets["unet"].config),
        "vae": single_file_utils.convert_ldm_vae_checkpoint(checkpoint, full_size.nets["vae"].config),
    }
    if single_file_utils.is_open_clip_model(checkpoint):
        text = single_file_utils.convert_open_clip_checkpoint(full_size.nets["text_encoder"], checkpoint)
    else:
        text = single_file_utils.convert_ldm_clip_checkpoint(checkpoint)
    converted["text_encoder"] = {k.removeprefix("text_model."): v for k, v in text.items()}
    for name, state in converted.items():
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        assert shapes == {k: v.shape for k, v in full_size.components[name].items()}, name


def test_sd15_resampler_names_are_those_of_the_released_file(full_sizes):
    # diffusers' converter accepts an up block's upsampler at `.1.conv` or `.2.conv`; LDM code (and the released
    # v1-5 file) puts it after the attention layer when there is one.
    state = full_sizes("sd15").state
    resamplers = {k for k in state if re.search(r"\.(op|conv)\.weight$", k) and "_blocks." in k}
    assert resamplers == {
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.input_blocks.6.0.op.weight",
        "model.diffusion_model.input_blocks.9.0.op.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",
        "model.diffusion_model.output_blocks.5.2.conv.weight",
        "model.diffusion_model.output_blocks.8.2.conv.weight",
    }
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)


def test_full_size_weights_fit_the_sdjax_modules_built_from_inferred_configs(full_size):
    configs = infer_configs(full_size.state, full_size.prediction_type)
    components = ldm_to_diffusers(full_size.state)
    for name in ("unet", "vae", "text_encoder"):
        config = configs[name]
        cls, _ = weights.component_class(config.get("_class_name") or config["architectures"][0])
        module = cls(config=cls.config_class.from_dict(config))
        shapes = weights.param_shapes(module)
        # Raises WeightsError listing every key that does not fit.
        weights.torch_to_flax(components[name], shapes, renames=module.torch_key_renames,
                              ignored=module.torch_ignored_keys)  # fmt: skip


def test_inpainting_unet_has_nine_input_channels():
    unet = {k: v for k, v in SD15["unet"].items() if k != "sample_size"}
    with torch.device("meta"):
        net = TorchUNet(**{**unet, "in_channels": 9})
    assert infer_configs(diffusers_to_ldm({"unet": _shape_only(net)}))["unet"]["in_channels"] == 9


# --- bad input


def test_sdxl_checkpoint_is_rejected_by_name():
    state = {
        "model.diffusion_model.input_blocks.0.0.weight": np.zeros((320, 4, 3, 3), np.float32),
        "conditioner.embedders.1.model.positional_embedding": np.zeros((77, 1280), np.float32),
    }
    with pytest.raises(WeightsError, match="SDXL is not supported"):
        ldm_to_diffusers(state)


def test_diffusers_format_file_is_rejected_with_a_hint():
    with pytest.raises(WeightsError, match="no model.diffusion_model.* UNet keys.*diffusers folder"):
        infer_configs({"conv_in.weight": np.zeros((32, 4, 3, 3), np.float32)})


def test_unknown_keys_are_listed_in_one_error(reference):
    state = _ldm_state(reference)
    state["model.diffusion_model.input_blocks.1.0.new_layer.weight"] = np.zeros(1, np.float32)
    state["first_stage_model.encoder.extra.weight"] = np.zeros(1, np.float32)
    with pytest.raises(WeightsError, match=r"model.diffusion_model: 1 keys .*input_blocks.1.0.new_layer.weight"):
        ldm_to_diffusers(state)


def test_file_without_vae_is_rejected(reference, tmp_path):
    state = {k: v for k, v in _ldm_state(reference).items() if not k.startswith("first_stage_model.")}
    save_file(state, str(tmp_path / "unet_only.safetensors"))
    with pytest.raises(WeightsError, match="lacks the VAE"):
        load_single_file(tmp_path / "unet_only.safetensors")


def test_pickle_checkpoint_is_rejected(tmp_path):
    (tmp_path / "model.ckpt").write_bytes(b"")
    with pytest.raises(WeightsError, match="not a .safetensors file"):
        load_single_file(tmp_path / "model.ckpt")


def test_unknown_prediction_type_is_rejected(reference):
    with pytest.raises(ValueError, match="prediction_type='x0'.*v_prediction"):
        infer_configs(_ldm_state(reference), prediction_type="x0")
