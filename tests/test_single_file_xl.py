"""Single-file SDXL checkpoints (sd_xl_base_1.0 / sd_xl_refiner_1.0 layout): files sdjax writes from the tiny diffusers
SDXL pipelines load in diffusers' own ``from_single_file`` and give its images; the file gives the folder's images;
configs inferred from full-size shapes are the published ones; families are told apart by the keys."""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from diffusers import UNet2DConditionModel as TorchUNet
from diffusers.loaders import single_file_utils
from safetensors.numpy import save_file
from transformers import CLIPTextConfig as TorchCLIPTextConfig
from transformers import CLIPTextModel as TorchCLIPTextModel
from transformers import CLIPTextModelWithProjection as TorchCLIPTextModelWithProjection

import sdjax
from sdjax import loading, weights
from sdjax.errors import PipelineError
from sdjax.loading import ldm_names_xl, single_file_xl
from sdjax.weights import WeightsError
from tests.published import published_config
from tests.reference import NEGATIVE, PROMPTS, tiny_sdxl_pipeline

jax.config.update("jax_default_matmul_precision", "highest")

TOLERANCE = 2e-3  # the bound on [0, 1] images
NETWORKS = ("unet", "vae", "text_encoder", "text_encoder_2")
PUBLISHED = Path(__file__).parent / "fixtures" / "published"


@dataclasses.dataclass
class Tiny:
    torch: object  # the diffusers pipeline
    folder: Path  # its diffusers folder
    file: Path  # the single file sdjax wrote from it
    components: dict  # its networks' state dicts (numpy)


def _state_dicts(pipe) -> dict:
    nets = {name: getattr(pipe, name, None) for name in NETWORKS}
    return {name: {k: v.numpy() for k, v in net.state_dict().items()} for name, net in nets.items() if net is not None}


def _build_tiny(variant: str, folder: Path) -> Tiny:
    pipe = tiny_sdxl_pipeline(folder / "diffusers", refiner=variant == "refiner")
    components = _state_dicts(pipe)
    file = folder / f"sd_xl_{variant}_tiny.safetensors"
    save_file(ldm_names_xl.diffusers_to_ldm(components), str(file))
    return Tiny(pipe, folder / "diffusers", file, components)


@pytest.fixture(scope="module")
def tinies(tmp_path_factory):
    """variant ("base" / "refiner") -> Tiny, each built once per module."""
    return functools.cache(lambda variant: _build_tiny(variant, tmp_path_factory.mktemp(variant)))


@pytest.fixture(scope="module", params=["base", "refiner"])
def tiny(request, tinies) -> Tiny:
    return tinies(request.param)


def _ldm_state(tiny: Tiny) -> dict:
    return weights.read_safetensors([tiny.file])


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _noise(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, 8, 8, 4)).astype(np.float32)


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# --- the layout, checked by diffusers' own single-file loader


def test_diffusers_from_single_file_reads_our_files_exactly(tiny):
    cls = StableDiffusionXLImg2ImgPipeline if tiny.file.name.startswith("sd_xl_refiner") else StableDiffusionXLPipeline
    pipe = cls.from_single_file(str(tiny.file), config=str(tiny.folder), local_files_only=True)
    assert _state_dicts(pipe).keys() == tiny.components.keys()
    for name, expected in _state_dicts(pipe).items():
        assert sorted(expected) == sorted(tiny.components[name]), name
        for key, value in expected.items():
            np.testing.assert_array_equal(value, tiny.components[name][key], err_msg=f"{name}.{key}")


def test_base_file_has_the_published_key_layout(tinies):
    keys = set(_ldm_state(tinies("base")))
    for key in (
        "model.diffusion_model.label_emb.0.0.weight",
        "model.diffusion_model.label_emb.0.2.bias",
        "model.diffusion_model.input_blocks.2.0.op.weight",  # one ResNet per block in the tiny UNet
        "model.diffusion_model.output_blocks.0.1.transformer_blocks.1.attn2.to_k.weight",
        "first_stage_model.encoder.mid.attn_1.q.weight",
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "conditioner.embedders.1.model.transformer.resblocks.2.attn.in_proj_weight",
        "conditioner.embedders.1.model.text_projection",
        "conditioner.embedders.1.model.positional_embedding",
        "conditioner.embedders.1.model.ln_final.weight",
    ):
        assert key in keys, key
    assert single_file_utils.is_clip_sdxl_model(keys) and single_file_utils.is_open_clip_sdxl_model(keys)


def test_refiner_file_has_only_the_open_clip_encoder_as_embedder_0(tinies):
    keys = set(_ldm_state(tinies("refiner")))
    assert single_file_utils.is_open_clip_sdxl_refiner_model(keys)
    assert {k.split(".")[3] for k in keys if k.startswith("conditioner.")} == {"model"}


def test_text_projection_is_stored_in_by_out(tinies):
    state, tiny = _ldm_state(tinies("base")), tinies("base")
    expected = tiny.components["text_encoder_2"]["text_projection.weight"].T
    np.testing.assert_array_equal(state["conditioner.embedders.1.model.text_projection"], expected)


def test_ldm_to_diffusers_inverts_diffusers_to_ldm(tiny):
    back = ldm_names_xl.ldm_to_diffusers(ldm_names_xl.diffusers_to_ldm(tiny.components))
    assert sorted(back) == sorted(tiny.components)
    for name, state in tiny.components.items():
        text = name.startswith("text_encoder")
        bare = lambda k, text=text: text and not k.startswith(("text_model.", "text_projection."))
        expected = {f"text_model.{k}" if bare(k) else k: v for k, v in state.items()}
        if name == "text_encoder_2":  # OpenCLIP has no position_ids buffer
            expected = {k: v for k, v in expected.items() if not k.endswith("position_ids")}
        assert sorted(back[name]) == sorted(expected), name
        for key, value in expected.items():
            np.testing.assert_array_equal(back[name][key], value, err_msg=f"{name}.{key}")


def test_logit_scale_ema_and_loss_keys_are_ignored(tinies):
    state = _ldm_state(tinies("base"))
    extra = {
        "conditioner.embedders.1.model.logit_scale": np.float32(4.6),
        "model_ema.decay": np.float32(0.9999),
        "first_stage_model.loss.logvar": np.zeros((), np.float32),
        "denoiser.sigmas": np.ones(1000, np.float32),
    }
    plain, converted = ldm_names_xl.ldm_to_diffusers(state), ldm_names_xl.ldm_to_diffusers({**state, **extra})
    for name in plain:
        assert sorted(converted[name]) == sorted(plain[name]), name


# --- images


def test_base_file_images_match_diffusers_from_single_file(tinies):
    tiny = tinies("base")
    torch_pipe = StableDiffusionXLPipeline.from_single_file(str(tiny.file), config=str(tiny.folder),
                                                            local_files_only=True)  # fmt: skip
    torch_pipe.set_progress_bar_config(disable=True)
    latents = _noise()
    with torch.no_grad():
        expected = torch_pipe(PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=8, guidance_scale=5.0,
                              latents=_nchw(latents), output_type="np").images  # fmt: skip
    pipe = sdjax.StableDiffusionXL.from_pretrained(tiny.file, config=tiny.folder)
    images = pipe.generate(PROMPTS, NEGATIVE, num_inference_steps=8, guidance_scale=5.0, latents=latents)
    error = np.abs(images - expected).max()
    print(f"sdxl base single file: max|sdjax - diffusers from_single_file| = {error:.2e}")
    assert images.shape == expected.shape == (2, 16, 16, 3)
    assert error <= TOLERANCE


def test_refiner_file_images_match_diffusers_from_single_file(tinies):
    tiny = tinies("refiner")
    torch_pipe = StableDiffusionXLImg2ImgPipeline.from_single_file(str(tiny.file), config=str(tiny.folder),
                                                                   local_files_only=True)  # fmt: skip
    torch_pipe.set_progress_bar_config(disable=True)
    handed = _noise(1)  # stands in for the base's latents at denoising_end
    with torch.no_grad():
        expected = torch_pipe(PROMPTS, num_inference_steps=10, denoising_start=0.8, image=_nchw(handed),
                              output_type="np").images  # fmt: skip
    pipe = sdjax.from_pretrained(tiny.file, config=tiny.folder)
    images = pipe.generate(PROMPTS, num_inference_steps=10, denoising_start=0.8, init_image=handed)
    error = np.abs(images - expected).max()
    print(f"sdxl refiner single file (denoising_start 0.8): max|sdjax - diffusers from_single_file| = {error:.2e}")
    assert images.shape == expected.shape == (2, 16, 16, 3)
    assert error <= TOLERANCE


def test_file_gives_the_folders_images(tiny):
    from_folder = sdjax.from_pretrained(tiny.folder)
    from_file = sdjax.from_pretrained(tiny.file, config=tiny.folder)
    assert type(from_file) is type(from_folder) is sdjax.StableDiffusionXL
    kwargs = dict(num_inference_steps=4, latents=_noise())
    if from_folder.requires_aesthetics_score:
        kwargs = dict(num_inference_steps=8, denoising_start=0.5, init_image=_noise(1))
    np.testing.assert_array_equal(from_file.generate(PROMPTS, **kwargs), from_folder.generate(PROMPTS, **kwargs))


def test_saved_pipeline_loads_in_diffusers_from_single_file_with_the_folders_weights(tiny, tmp_path):
    refiner = "text_encoder" not in tiny.components
    file = single_file_xl.save_single_file(sdjax.from_pretrained(tiny.folder), tmp_path / "x.safetensors", np.float32)
    cls = StableDiffusionXLImg2ImgPipeline if refiner else StableDiffusionXLPipeline
    pipe = cls.from_single_file(str(file), config=str(tiny.folder), local_files_only=True)
    for name, state in _state_dicts(pipe).items():
        assert sorted(state) == sorted(tiny.components[name]), name
        for key, value in state.items():
            np.testing.assert_array_equal(value, tiny.components[name][key], err_msg=f"{name}.{key}")


# --- what the published models fix: tokenizers, scheduler, model_index options, configs


def test_file_without_config_gets_the_published_defaults(tiny):
    c = loading.load(tiny.file)
    variant = "refiner" if "text_encoder" not in tiny.components else "base"
    index = json.loads((PUBLISHED / f"sdxl_{variant}" / "model_index.json").read_text())
    scheduler = json.loads((PUBLISHED / f"sdxl_{variant}" / "scheduler" / "scheduler_config.json").read_text())
    assert c.family == "sdxl" and c.scheduler_class == scheduler["_class_name"] == "EulerDiscreteScheduler"
    assert c.options == {"force_zeros_for_empty_prompt": index["force_zeros_for_empty_prompt"],
                         "requires_aesthetics_score": index.get("requires_aesthetics_score", False)}  # fmt: skip
    pads = {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}
    assert {name: tok.pad_token for name, tok in c.tokenizers.items()} == {n: pads[n] for n in c.tokenizers}
    assert sorted(c.tokenizers) == sorted(n for n in pads if index[n][0] is not None)
    assert all(len(tok) == 49408 for tok in c.tokenizers.values())
    assert sorted(c.modules) == sorted(tiny.components)


def test_shipped_scheduler_config_is_the_published_file():
    shipped = (Path(sdjax.__file__).parent / "assets" / single_file_xl.SCHEDULER_ASSET).read_bytes()
    for variant in ("sdxl_base", "sdxl_refiner"):
        assert shipped == (PUBLISHED / variant / "scheduler" / "scheduler_config.json").read_bytes()


def test_bfloat16_file_keeps_the_force_upcast_vae_in_float32(tinies):
    tiny = tinies("base")
    pipe = sdjax.StableDiffusionXL.from_pretrained(tiny.file, jnp.bfloat16, config=tiny.folder)
    dtypes = {name: {x.dtype for x in jax.tree.leaves(p)} for name, p in pipe.params.items()}
    assert dtypes["vae"] == {jnp.dtype(jnp.float32)} and pipe.vae.dtype == jnp.float32
    assert dtypes["unet"] == dtypes["text_encoder_2"] == {jnp.dtype(jnp.bfloat16)}


FULL_SIZE = ("sdxl_base", "sdxl_refiner")


@dataclasses.dataclass
class FullSize:
    configs: dict  # published config.json dicts
    nets: dict  # the PyTorch networks on the meta device
    components: dict  # their state dicts as zero-stride numpy arrays: real keys and shapes, no memory
    state: dict  # ldm_names_xl.diffusers_to_ldm(components)


def _shape_only(net: torch.nn.Module) -> dict:
    return {k: np.broadcast_to(np.float16(0), tuple(v.shape)) for k, v in net.state_dict().items()}


def _build_full_size(name: str) -> FullSize:
    names = ("unet", "vae", "text_encoder_2") + (("text_encoder",) if name == "sdxl_base" else ())
    configs = {n: published_config(name, n) for n in names}
    classes = {"text_encoder": TorchCLIPTextModel, "text_encoder_2": TorchCLIPTextModelWithProjection}
    with torch.device("meta"):
        nets = {n: TorchUNet.from_config(configs[n]) if n == "unet" else TorchAutoencoderKL.from_config(configs[n])
                for n in ("unet", "vae")}  # fmt: skip
        nets.update({n: classes[n](TorchCLIPTextConfig(**configs[n])) for n in names if n in classes})
    components = {n: _shape_only(net) for n, net in nets.items()}
    return FullSize(configs, nets, components, ldm_names_xl.diffusers_to_ldm(components))


@pytest.fixture(scope="module")
def full_sizes():
    return functools.cache(_build_full_size)


@pytest.fixture(scope="module", params=FULL_SIZE)
def full_size(request, full_sizes) -> FullSize:
    return full_sizes(request.param)


def test_configs_inferred_from_full_size_shapes_are_the_published_ones(full_size):
    inferred = single_file_xl.infer_configs(full_size.state)
    assert sorted(inferred) == sorted([*full_size.configs, "scheduler"])
    for name, published in full_size.configs.items():
        net = full_size.nets[name].config
        defaults = dict(net) if isinstance(net, dict) else net.to_dict()  # fields the published file leaves out
        got = {k: v for k, v in inferred[name].items() if k not in ("_class_name", "architectures", "model_type")}
        assert got == {k: published.get(k, defaults[k]) for k in got}, name


def test_diffusers_infers_the_model_type_of_full_size_files(full_size):
    checkpoint = {k: torch.empty(v.shape, device="meta") for k, v in full_size.state.items()}
    expected = "xl_base" if "text_encoder" in full_size.configs else "xl_refiner"
    assert single_file_utils.infer_diffusers_model_type(checkpoint) == expected
    assert ldm_names_xl.is_sdxl(checkpoint) and ldm_names_xl.variant_of(checkpoint) == expected.removeprefix("xl_")


def test_full_size_names_match_diffusers_converters(full_size):
    """diffusers' converters, run on shape-only tensors, map our LDM names back onto the diffusers state dicts."""
    checkpoint = {k: torch.empty(v.shape, device="meta") for k, v in full_size.state.items()}
    converted = {
        "unet": single_file_utils.convert_ldm_unet_checkpoint(checkpoint, full_size.nets["unet"].config),
        "vae": single_file_utils.convert_ldm_vae_checkpoint(checkpoint, full_size.nets["vae"].config),
    }
    prefix = "conditioner.embedders.1.model." if "text_encoder" in full_size.nets else "conditioner.embedders.0.model."
    converted["text_encoder_2"] = single_file_utils.convert_open_clip_checkpoint(
        full_size.nets["text_encoder_2"], checkpoint, prefix=prefix
    )
    if "text_encoder" in full_size.nets:
        text = single_file_utils.convert_ldm_clip_checkpoint(checkpoint)
        converted["text_encoder"] = {k.removeprefix("text_model."): v for k, v in text.items()}
    for name, state in converted.items():
        expected = {k: v.shape for k, v in full_size.components[name].items() if not k.endswith("position_ids")}
        assert {k: tuple(v.shape) for k, v in state.items()} == expected, name


def test_full_size_weights_fit_the_sdjax_modules_built_from_inferred_configs(full_size):
    configs = single_file_xl.infer_configs(full_size.state)
    components = ldm_names_xl.ldm_to_diffusers(full_size.state)
    for name in full_size.configs:
        cls, _ = weights.component_class(configs[name].get("_class_name") or configs[name]["architectures"][0])
        module = cls(config=cls.config_class.from_dict(configs[name]))
        # Raises WeightsError listing every key that does not fit.
        weights.torch_to_flax(components[name], weights.param_shapes(module), renames=module.torch_key_renames,
                              ignored=module.torch_ignored_keys)  # fmt: skip


# --- families from the keys, and bad input


def _write(path: Path, state: dict) -> Path:
    save_file({k: np.zeros(shape, np.float32) for k, shape in state.items()}, str(path))
    return path


@pytest.fixture
def sd_file(tmp_path) -> Path:
    shapes = {
        "model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": (8,),
    }
    return _write(tmp_path / "v1-5.safetensors", shapes)


def test_family_of_reads_sdxl_from_the_keys_only(tiny, sd_file, monkeypatch):
    def no_tensors(*args, **kwargs):
        raise AssertionError("family_of read tensors")

    monkeypatch.setattr(weights, "read_safetensors", no_tensors)
    assert loading.family_of(tiny.file) == "sdxl"
    assert loading.family_of(sd_file) == "sd"


def test_sd_class_on_an_sdxl_file_names_the_sdxl_class(tinies):
    with pytest.raises(PipelineError) as error:
        sdjax.StableDiffusion.from_pretrained(tinies("refiner").file)
    assert "is an sdxl single-file checkpoint, not sd: load it with sdjax.StableDiffusionXL.from_pretrained or " \
           "sdjax.from_pretrained" in _one_line(error)  # fmt: skip


def test_sdxl_class_on_an_sd_file_names_the_sd_class(sd_file):
    with pytest.raises(PipelineError) as error:
        sdjax.StableDiffusionXL.from_pretrained(sd_file)
    assert "is an sd single-file checkpoint, not sdxl: load it with sdjax.StableDiffusion.from_pretrained" in _one_line(
        error
    )


@pytest.mark.parametrize("load", [sdjax.from_pretrained, lambda p: sdjax.StableDiffusionXL.from_pretrained(p)],
                         ids=["from_pretrained", "StableDiffusionXL"])  # fmt: skip
def test_file_that_is_neither_is_one_line(load, tmp_path):
    lora = _write(tmp_path / "lora.safetensors", {"lora_unet_down_blocks_0.lora_down.weight": (4, 8)})
    with pytest.raises(PipelineError) as error:
        load(lora)
    assert "is neither an SD 1.x/2.x nor an SDXL single-file checkpoint" in _one_line(error)


def test_pickle_is_refused_by_both_classes(tmp_path):
    (tmp_path / "sd_xl_base_1.0.ckpt").write_bytes(b"")
    for cls in (sdjax.StableDiffusion, sdjax.StableDiffusionXL):
        with pytest.raises(PipelineError, match=r"read as .safetensors only \(got '.ckpt'\)"):
            cls.from_pretrained(tmp_path / "sd_xl_base_1.0.ckpt")


def test_config_folder_of_the_other_variant_is_refused(tinies):
    with pytest.raises(PipelineError) as error:
        sdjax.StableDiffusionXL.from_pretrained(tinies("refiner").file, config=tinies("base").folder)
    assert "give the folder of the same SDXL variant" in _one_line(error)


def test_config_is_refused_for_folders(tinies):
    with pytest.raises(PipelineError, match="config=.* is read for single-file SDXL checkpoints only"):
        sdjax.StableDiffusionXL.from_pretrained(tinies("base").folder, config=tinies("base").folder)


def test_sdxl_file_without_vae_is_refused(tinies, tmp_path):
    state = {k: v for k, v in _ldm_state(tinies("base")).items() if not k.startswith("first_stage_model.")}
    save_file(state, str(tmp_path / "no_vae.safetensors"))
    with pytest.raises(WeightsError, match="lacks the VAE"):
        sdjax.from_pretrained(tmp_path / "no_vae.safetensors")


def test_unknown_sdxl_keys_are_listed_in_one_error(tinies):
    state = _ldm_state(tinies("base"))
    state["model.diffusion_model.input_blocks.1.0.new_layer.weight"] = np.zeros(1, np.float32)
    with pytest.raises(WeightsError, match=r"1 keys do not fit the SDXL layout .*input_blocks.1.0.new_layer.weight"):
        ldm_names_xl.ldm_to_diffusers(state)


def test_unknown_text_encoders_are_refused():
    state = {"model.diffusion_model.label_emb.0.0.weight": np.zeros((4, 4), np.float32),
             "conditioner.embedders.2.model.positional_embedding": np.zeros((77, 8), np.float32)}  # fmt: skip
    with pytest.raises(WeightsError, match="SDXL text encoders not recognised"):
        ldm_names_xl.ldm_to_diffusers(state)


def test_config_folder_with_a_bad_field_names_the_network(tinies, tmp_path):
    folder = shutil.copytree(tinies("base").folder, tmp_path / "config")
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**config, "layers_per_block": "1"}))
    with pytest.raises(ValueError, match="unet config for sd_xl_base_tiny.safetensors: .*layers_per_block"):
        sdjax.StableDiffusionXL.from_pretrained(tinies("base").file, config=folder)
