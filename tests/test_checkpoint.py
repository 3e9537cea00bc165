"""sdjax.checkpoint: Orbax checkpoints of a run and the workdir contract with the pipeline."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sdjax import checkpoint
from sdjax.loading import folders
from sdjax.models.vae import AutoencoderKL, AutoencoderKLConfig
from sdjax.weights import load_component

PARAMS = {"unet": {"conv": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3), "bias": np.ones(3, np.float32)}}}
TINY_VAE = AutoencoderKLConfig(
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(8, 8),
    norm_num_groups=4,
    scaling_factor=1.25,
)


def scaled(tree, factor):
    return jax.tree.map(lambda x: x * factor, tree)


def save_run(workdir, steps, keep=3):
    """A fake run: params = step * PARAMS, EMA = step * PARAMS / 2, Adam state."""
    (workdir / "model").mkdir(parents=True, exist_ok=True)
    (workdir / "model" / "model_index.json").write_text("{}")
    tx = optax.adam(1e-3)
    ckpts = checkpoint.Checkpoints(workdir, keep=keep)
    for step in steps:
        items = {"params": scaled(PARAMS, step), "ema_params": scaled(PARAMS, step / 2), "opt_state": tx.init(PARAMS)}
        ckpts.save(step, items, {"data_position": 4 * step, "rng": [0, step]})
    ckpts.close()
    return tx


def test_restore_returns_saved_items_and_meta(tmp_path):
    tx = save_run(tmp_path, [3])
    ckpts = checkpoint.Checkpoints(tmp_path)
    items, meta = ckpts.restore({"params": PARAMS, "opt_state": tx.init(PARAMS)})
    ckpts.close()
    np.testing.assert_array_equal(items["params"]["unet"]["conv"]["kernel"], 3 * PARAMS["unet"]["conv"]["kernel"])
    assert isinstance(items["opt_state"][0], optax.ScaleByAdamState)
    assert meta == {"step": 3, "data_position": 12, "rng": [0, 3]}


def test_only_the_last_k_checkpoints_are_kept(tmp_path):
    save_run(tmp_path, [1, 2, 3, 4], keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3", "4"]


def test_interrupted_save_is_ignored(tmp_path):
    save_run(tmp_path, [5])
    # What a SIGKILL during an (atomic) save leaves behind.
    (tmp_path / "checkpoints" / "10.orbax-checkpoint-tmp-1234").mkdir()
    ckpts = checkpoint.Checkpoints(tmp_path)
    assert ckpts.latest_step() == 5
    ckpts.close()


def test_load_trained_params_prefers_ema_of_latest_step(tmp_path):
    save_run(tmp_path, [2, 4])
    loaded = checkpoint.load_trained_params(tmp_path)
    np.testing.assert_array_equal(loaded["unet"]["conv"]["bias"], np.full(3, 2.0, np.float32))


def test_load_trained_params_of_a_relative_workdir(tmp_path, monkeypatch):
    """`python -m sdjax.export workdirs/run ...`: Orbax reads absolute paths only."""
    save_run(tmp_path / "run", [2])
    monkeypatch.chdir(tmp_path)
    loaded = checkpoint.load_trained_params("run")
    np.testing.assert_array_equal(loaded["unet"]["conv"]["bias"], np.full(3, 1.0, np.float32))  # EMA: step / 2


def test_load_trained_params_of_a_given_step_without_ema(tmp_path):
    save_run(tmp_path, [2, 4])
    loaded = checkpoint.load_trained_params(tmp_path, step=2, ema=False)
    np.testing.assert_array_equal(loaded["unet"]["conv"]["bias"], np.full(3, 2.0, np.float32))


def test_load_trained_params_falls_back_to_params_without_ema(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model_index.json").write_text("{}")
    ckpts = checkpoint.Checkpoints(tmp_path)
    ckpts.save(7, {"params": PARAMS}, {"data_position": 7})
    ckpts.close()
    loaded = checkpoint.load_trained_params(tmp_path)
    np.testing.assert_array_equal(loaded["unet"]["conv"]["kernel"], PARAMS["unet"]["conv"]["kernel"])


def test_load_trained_params_of_a_missing_step_names_the_available_ones(tmp_path):
    save_run(tmp_path, [2, 4])
    with pytest.raises(checkpoint.CheckpointError, match=r"step 3.*\[2, 4\]"):
        checkpoint.load_trained_params(tmp_path, step=3)


def test_a_plain_folder_is_not_a_workdir(tmp_path):
    (tmp_path / "model").mkdir()
    assert not checkpoint.is_workdir(tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match="not an sdjax workdir"):
        checkpoint.load_trained_params(tmp_path)


def test_a_saved_run_is_a_workdir(tmp_path):
    save_run(tmp_path, [1])
    assert checkpoint.is_workdir(tmp_path)


def test_save_rejects_unknown_items(tmp_path):
    ckpts = checkpoint.Checkpoints(tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match="unknown checkpoint items.*accepted"):
        ckpts.save(1, {"weights": PARAMS}, {})
    ckpts.close()


def vae_and_params():
    vae = AutoencoderKL(TINY_VAE)
    shapes = jax.eval_shape(vae.init, jax.random.key(0), *vae.dummy_inputs())["params"]
    return vae, jax.tree.map(lambda s: jnp.full(s.shape, 0.5, s.dtype), shapes)


def test_model_folder_holds_weights_of_frozen_components_only(tmp_path):
    vae, params = vae_and_params()
    folders.write_model_folder(tmp_path / "model", {"vae": (vae, params), "unet": (vae, None)})
    assert (tmp_path / "model" / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "model" / "unet").iterdir()) == ["config.json"]
    module, loaded = load_component(tmp_path / "model" / "vae")
    assert module.config.scaling_factor == 1.25
    np.testing.assert_array_equal(loaded["decoder"]["conv_out"]["bias"], params["decoder"]["conv_out"]["bias"])


def test_stage1_model_index_describes_a_vae(tmp_path):
    vae, _ = vae_and_params()
    folders.write_model_folder(tmp_path / "model", {"vae": (vae, None)})
    index = json.loads((tmp_path / "model" / "model_index.json").read_text())
    assert index["_class_name"] == "AutoencoderKL"
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["_sdjax_trained"] == ["vae"]
    assert not (tmp_path / "model.tmp").exists()
