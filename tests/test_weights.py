"""Torch-free weight conversion: key mapping, layouts, and the one-error-for-all-problems contract."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from sdjax import weights
from sdjax.weights import WeightsError

EXPECTED = {
    "conv_in": {
        "kernel": jax.ShapeDtypeStruct((8, 4, 3, 3), np.float32),
        "bias": jax.ShapeDtypeStruct((8,), np.float32),
    },
    "down_blocks_0": {
        "resnets_1": {"norm1": {"scale": jax.ShapeDtypeStruct((8,), np.float32)}},
        "attentions_0": {"to_out_0": {"kernel": jax.ShapeDtypeStruct((6, 8), np.float32)}},
    },
    "time_embedding": {"linear_1": {"kernel": jax.ShapeDtypeStruct((16, 8), np.float32)}},
    "token_embedding": {"embedding": jax.ShapeDtypeStruct((10, 8), np.float32)},
}


def torch_state(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "conv_in.weight": rng.normal(size=(8, 4, 3, 3)).astype(np.float32),
        "conv_in.bias": rng.normal(size=(8,)).astype(np.float32),
        "down_blocks.0.resnets.1.norm1.weight": rng.normal(size=(8,)).astype(np.float32),
        "down_blocks.0.attentions.0.to_out.0.weight": rng.normal(size=(6, 8)).astype(np.float32),
        "time_embedding.linear_1.weight": rng.normal(size=(16, 8)).astype(np.float32),
        "token_embedding.weight": rng.normal(size=(10, 8)).astype(np.float32),
    }


def test_torch_keys_map_to_flax_paths_and_back():
    for key in torch_state():
        path = weights.torch_key_to_path(key)
        leaf = {"weight": "kernel"}.get(path[-1], path[-1])
        assert weights.path_to_torch_key(path[:-1] + (leaf,)) == key
    assert weights.torch_key_to_path("down_blocks.0.attentions.0.to_out.0.weight") == (
        "down_blocks_0",
        "attentions_0",
        "to_out_0",
        "weight",
    )


def test_conversion_keeps_torch_kernel_layouts_and_renames_norm_and_embedding():
    state = torch_state()
    params = weights.torch_to_flax(state, EXPECTED)
    np.testing.assert_array_equal(params["conv_in"]["kernel"], state["conv_in.weight"])
    np.testing.assert_array_equal(
        params["time_embedding"]["linear_1"]["kernel"], state["time_embedding.linear_1.weight"]
    )
    np.testing.assert_array_equal(
        params["down_blocks_0"]["resnets_1"]["norm1"]["scale"], state["down_blocks.0.resnets.1.norm1.weight"]
    )
    np.testing.assert_array_equal(params["token_embedding"]["embedding"], state["token_embedding.weight"])


def test_export_inverts_import():
    state = torch_state()
    back = weights.flax_to_torch(weights.torch_to_flax(state, EXPECTED))
    assert back.keys() == state.keys()
    for key in state:
        np.testing.assert_array_equal(back[key], state[key])


def test_one_error_lists_missing_unexpected_and_mismatched_keys():
    state = torch_state()
    del state["conv_in.bias"]
    state["conv_out.weight"] = np.zeros((1,), np.float32)
    state["time_embedding.linear_1.weight"] = np.zeros((16, 9), np.float32)
    with pytest.raises(WeightsError) as e:
        weights.torch_to_flax(state, EXPECTED, component="UNet2DConditionModel")
    message = str(e.value)
    assert "\n" not in message
    assert "1 missing (conv_in.bias)" in message
    assert "1 unexpected (conv_out.weight)" in message
    assert "1 shape-mismatched (time_embedding.linear_1.weight (16, 9) vs model (16, 8))" in message


def test_error_lists_only_the_first_few_of_many_keys():
    state = {f"extra.{i}.weight": np.zeros(1, np.float32) for i in range(20)}
    with pytest.raises(WeightsError, match=r"20 unexpected \(.*\(\+15 more\)\)"):
        weights.torch_to_flax({**torch_state(), **state}, EXPECTED)


def test_ignored_buffers_and_renamed_legacy_keys():
    state = torch_state()
    state["position_ids"] = np.arange(3)
    state["legacy_token_embedding.weight"] = state.pop("token_embedding.weight")
    params = weights.torch_to_flax(
        state, EXPECTED, renames=[(r"^legacy_token_embedding", "token_embedding")], ignored=[r"position_ids"]
    )
    assert params["token_embedding"]["embedding"].shape == (10, 8)


def test_one_by_one_conv_loads_into_linear_kernel():
    expected = {"to_q": {"kernel": jax.ShapeDtypeStruct((8, 8), np.float32)}}
    w = np.random.default_rng(1).normal(size=(8, 8, 1, 1)).astype(np.float32)
    params = weights.torch_to_flax({"to_q.weight": w}, expected)
    np.testing.assert_array_equal(params["to_q"]["kernel"], w[:, :, 0, 0])


def test_weight_files_prefer_plain_then_fp16_and_read_shards(tmp_path):
    save_file({"a": np.ones(2, np.float16)}, str(tmp_path / "diffusion_pytorch_model.fp16.safetensors"))
    assert weights.find_weight_files(tmp_path) == [tmp_path / "diffusion_pytorch_model.fp16.safetensors"]
    shards = tmp_path / "sharded"
    shards.mkdir()
    save_file({"a": np.ones(2, np.float32)}, str(shards / "model-00001-of-00002.safetensors"))
    save_file({"b": np.zeros(3, np.float32)}, str(shards / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (shards / "model.safetensors.index.json").write_text(json.dumps(index))
    state = weights.read_safetensors(weights.find_weight_files(shards, "transformers"))
    assert set(state) == {"a", "b"} and state["b"].shape == (3,)


def test_missing_weight_file_names_what_was_found(tmp_path):
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(WeightsError, match=r"found: diffusion_pytorch_model.bin.*safe_serialization=True"):
        weights.find_weight_files(tmp_path)


def test_corrupt_weight_file_is_one_clear_error(tmp_path):
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(WeightsError, match="cannot read"):
        weights.read_safetensors([tmp_path / "diffusion_pytorch_model.safetensors"])


def test_bfloat16_tensors_are_read_without_torch(tmp_path):
    import ml_dtypes

    save_file({"w": np.arange(4, dtype=np.float32).astype(ml_dtypes.bfloat16)}, str(tmp_path / "x.safetensors"))
    state = weights.read_safetensors([tmp_path / "x.safetensors"])
    np.testing.assert_array_equal(state["w"].astype(np.float32), np.arange(4, dtype=np.float32))


def test_component_folder_errors(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        weights.load_component(tmp_path / "nope")
    with pytest.raises(WeightsError, match="no config.json"):
        weights.load_component(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(
        WeightsError, match="unsupported component class 'UNet2DModel'.*supported: UNet2DConditionModel"
    ):
        weights.load_component(tmp_path)


TINY_VAE = dict(
    block_out_channels=[8, 16],
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    norm_num_groups=4,
    layers_per_block=1,
    sample_size=16,
)


@pytest.fixture
def vae_folder(tmp_path):
    from sdjax.models.vae import AutoencoderKL, AutoencoderKLConfig

    vae = AutoencoderKL(AutoencoderKLConfig.from_dict(TINY_VAE))
    params = vae.init(jax.random.key(0), *vae.dummy_inputs())["params"]
    weights.save_component(vae, params, tmp_path)
    return tmp_path


def rewrite_weights(folder, edit):
    from safetensors.numpy import load_file

    file = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(str(file))
    edit(state)
    save_file(state, str(file))


def test_saved_component_loads_back_identically(vae_folder):
    module, params = weights.load_component(vae_folder)
    module2, params2 = weights.load_component(vae_folder)
    assert module.config == module2.config
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), params, params2))


def test_component_with_missing_unexpected_and_mismatched_keys_is_one_error(vae_folder):
    def edit(state):
        del state["decoder.conv_out.bias"]
        state["encoder.extra.weight"] = np.zeros(3, np.float32)
        state["quant_conv.weight"] = np.zeros((8, 8, 3, 3), np.float32)

    rewrite_weights(vae_folder, edit)
    with pytest.raises(WeightsError) as e:
        weights.load_component(vae_folder)
    message = str(e.value)
    assert "AutoencoderKL" in message and str(vae_folder) in message
    assert "1 missing (decoder.conv_out.bias)" in message
    assert "1 unexpected (encoder.extra.weight)" in message
    assert "1 shape-mismatched (quant_conv.weight (8, 8, 3, 3) vs model (8, 8, 1, 1))" in message


def test_component_config_with_unsupported_fields_is_one_error(vae_folder):
    from sdjax.models.config import UnsupportedConfigError

    config = json.loads((vae_folder / "config.json").read_text())
    config["act_fn"] = "gelu"
    (vae_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedConfigError, match="act_fn='gelu'"):
        weights.load_component(vae_folder)


def test_to_device_reads_mapped_tensors_as_stored_and_casts(tmp_path):
    """Loading copies each tensor of the mapped file once (read with pread, not through the mapping) into an
    aligned buffer, casting on the way; odd tensor sizes leave the later tensors unaligned in the file."""
    rng = np.random.default_rng(3)
    state = {
        "a.weight": rng.normal(size=(3,)).astype(np.float32),  # 12 bytes: misaligns what follows
        "b.weight": rng.normal(size=(7, 5, 3, 3)).astype(np.float32),
        "c.weight": rng.normal(size=(6, 4)).astype(np.float16),
    }
    save_file(state, str(tmp_path / "w.safetensors"))
    mapped = weights.read_safetensors([tmp_path / "w.safetensors"])
    assert all(weights._file_range(np.asarray(v)) is not None for v in mapped.values())
    for dtype in (np.float32, jnp.bfloat16):
        out = weights.to_device(dict(mapped), dtype, component="test")
        for key, value in state.items():
            assert out[key].dtype == dtype
            np.testing.assert_array_equal(np.asarray(out[key]), value.astype(dtype))


def test_file_truncated_after_its_header_was_read_is_one_error(tmp_path):
    file = tmp_path / "w.safetensors"
    save_file({"w.weight": np.ones((256, 256), np.float32)}, str(file))
    mapped = weights.read_safetensors([file])
    os.truncate(file, file.stat().st_size - 4096)
    with pytest.raises(WeightsError, match="shorter than its header says"):
        weights.to_device(mapped, np.float32, component="test")
