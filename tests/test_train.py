"""Training: losses, optimizer and EMA, the update steps of both stages, and the loop (resume, preemption,
divergence, multi-device). Tiny models from the configs' ``:tiny`` variants; the PyTorch reference is diffusers'
training utilities.

Compiling the update steps dominates the run time, so all tests share one persistent compilation cache (also
passed to the train.py subprocesses) and one test config whose update step compiles to the same program everywhere.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sdjax import checkpoint, parallel, schedule
from sdjax.models.vae import AutoencoderKL, AutoencoderKLConfig
from sdjax.train import checks, diffusion_stage, loop, losses, monitor, steps
from sdjax.train import model as model_lib
from sdjax.train import state as state_lib
from sdjax.train.vae_stage import VAEStage
from sdjax.weights import load_component

REPO = Path(__file__).resolve().parents[1]
RES, BATCH = 16, 8  # the :tiny configs' resolution and global batch


def load_config(name: str, arg: str = "tiny"):
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def vae_config(**overrides):
    """Stage-1 tiny config. A constant learning rate keeps the compiled step independent of config.steps."""
    config = load_config("shapes64_vae")
    config.optim.schedule = "constant"
    config.steps, config.checkpoint_every, config.log_every = 6, 2, 1
    config.async_checkpoints = False
    # Adam's first update is g / (|g| + eps): with a tiny eps, float rounding of the device-split mean gradient
    # would be amplified where |g| ~ eps, and 1- and 2-device updates could not be compared tightly.
    config.optim.eps = 1e-3
    for key, value in overrides.items():
        config[key] = value
    return config


def cli_overrides(config) -> list[str]:
    return ["--config.optim.schedule=constant", f"--config.checkpoint_every={config.checkpoint_every}",
            "--config.log_every=1", "--config.async_checkpoints=False"]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Persistent compilation cache for this module (and its subprocesses); the previous settings come back after."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")  # fmt: skip
    previous = {name: getattr(jax.config, name) for name in names}
    cache = tmp_path_factory.mktemp("jax_cache")
    for name, value in zip(names, (str(cache), 0.0, 0), strict=True):
        jax.config.update(name, value)
    yield cache
    for name, value in previous.items():
        jax.config.update(name, value)


def cache_env(cache: Path) -> dict[str, str]:
    """Environment of a subprocess that shares this module's compilation cache."""
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


def synthetic_batches(position: int, *, sigterm_at: int | None = None, nan_at: int | None = None, vocab: int = 300):
    """Batch p is a pure function of p, like the real input pipeline; optionally SIGTERMs or turns NaN at p."""
    while True:
        rng = np.random.default_rng(position)
        image = rng.uniform(-1, 1, (1, BATCH, RES, RES, 3)).astype(np.float32)
        if position == nan_at:
            image[:] = np.nan
        if position == sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        yield {"image": image, "input_ids": rng.integers(0, vocab, (1, BATCH, 77)).astype(np.int32)}
        position += 1


def max_abs_diff(a, b) -> float:
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in pairs)


# ----------------------------------------------------------------------------------------------- losses


def test_min_snr_weights_match_diffusers_training_scripts():
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([0, 10, 250, 500, 999])
    snr = compute_snr(scheduler, t)
    gamma = 5.0
    clipped = torch.stack([snr, gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    ac = schedule.alphas_cumprod(schedule.ScheduleConfig())
    ours = schedule.snr(ac, jnp.asarray(t.numpy()))
    for prediction_type, expected in (("epsilon", clipped / snr), ("v_prediction", clipped / (snr + 1))):
        np.testing.assert_allclose(losses.min_snr_weights(ours, gamma, prediction_type), expected, rtol=1e-5)


def test_min_snr_weight_is_one_at_zero_terminal_snr():
    assert float(losses.min_snr_weights(jnp.zeros(1), 5.0, "epsilon")[0]) == 1.0


def test_v_prediction_target_matches_diffusers_get_velocity():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    rng = np.random.default_rng(0)
    x0, noise = rng.standard_normal((2, 2, 4, 4, 3)).astype(np.float32)
    t = np.array([3, 700])
    expected = scheduler.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
    ac = schedule.alphas_cumprod(schedule.ScheduleConfig())
    ours = losses.diffusion_target(ac, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t), "v_prediction")
    np.testing.assert_allclose(ours, expected.numpy(), atol=1e-6)


def test_unknown_prediction_type_is_rejected():
    with pytest.raises(ValueError, match="unknown prediction_type 'x0'; accepted: epsilon, v_prediction, sample"):
        losses.min_snr_weights(jnp.ones(1), 5.0, "x0")


def test_offset_noise_shifts_each_channel_of_each_example_by_a_constant():
    noise = jnp.zeros((2, 3, 3, 4))
    offset = jnp.arange(8.0).reshape(2, 4)
    shifted = losses.offset_noise(noise, offset, 0.1)
    np.testing.assert_allclose(shifted[1, 2, 0], 0.1 * offset[1])
    np.testing.assert_allclose(shifted[0, 0, 0], shifted[0, 2, 1])


def test_psnr_of_a_uniform_error():
    images = jnp.zeros((1, 4, 4, 3))
    # 0.2 in [-1, 1] is 0.1 in [0, 1]: mse 0.01, PSNR 20 dB.
    np.testing.assert_allclose(losses.psnr(images, images + 0.2), [20.0], rtol=1e-5)


def test_vae_loss_is_reconstruction_plus_weighted_kl():
    images = jnp.zeros((2, 4, 4, 3))
    loss, metrics = losses.vae_loss(images, images + 0.5, jnp.array([100.0, 300.0]), kind="l2", kl_weight=1e-3)
    np.testing.assert_allclose(loss, 0.25 + 1e-3 * 200.0, rtol=1e-6)
    np.testing.assert_allclose(metrics["kl"], 200.0)


def test_unknown_reconstruction_loss_is_rejected():
    with pytest.raises(ValueError, match="unknown reconstruction loss 'l3'; accepted: l1, l2"):
        losses.reconstruction_loss(jnp.zeros((1, 2, 2, 3)), jnp.zeros((1, 2, 2, 3)), "l3")


# ----------------------------------------------------------------------------------------------- optimizer and EMA


def test_ema_matches_diffusers_ema_model():
    from diffusers.training_utils import EMAModel

    torch_param = torch.nn.Parameter(torch.zeros(3))
    ema = EMAModel([torch_param], decay=0.9)
    ours = {"w": jnp.zeros(3)}
    for n in range(6):
        value = torch.full((3,), float(n + 1))
        torch_param.data.copy_(value)
        ema.step([torch_param])
        decay = state_lib.ema_decay(n, 0.9, 10.0)
        ours = state_lib.update_ema(ours, {"w": jnp.asarray(value.numpy())}, decay)
    np.testing.assert_allclose(ours["w"], ema.shadow_params[0].numpy(), rtol=1e-6)


def test_learning_rate_warms_up_then_decays_to_zero():
    config = vae_config()
    config.optim.update(schedule="cosine", warmup_steps=10, lr=1e-3)
    config.steps = 100
    lr = state_lib.learning_rate_schedule(config)
    assert float(lr(0)) == 0.0
    np.testing.assert_allclose([lr(5), lr(10), lr(100)], [5e-4, 1e-3, 0.0], atol=1e-9)


def test_constant_learning_rate_after_warmup():
    config = vae_config()
    config.optim.update(warmup_steps=4, lr=1e-3)
    lr = state_lib.learning_rate_schedule(config)
    np.testing.assert_allclose([lr(2), lr(4), lr(1000)], [5e-4, 1e-3, 1e-3], atol=1e-9)


def quadratic_grads(params, batch):
    return jax.grad(lambda p: jnp.mean((p["w"] - batch) ** 2))(params)


def test_gradient_accumulation_equals_one_step_on_the_mean_gradient():
    config = vae_config(grad_accum_steps=2)
    params, batches = {"w": jnp.ones(3)}, [jnp.array([1.0, 2.0, 3.0]), jnp.array([-2.0, 0.0, 5.0])]
    accumulated = state_lib.create_train_state(
        params, state_lib.make_optimizer(config), ema=False, accumulation_steps=2
    )
    for batch in batches:
        accumulated = state_lib.apply_update(
            accumulated, quadratic_grads(params, batch), ema_decay_max=0.9, ema_warmup=10
        )
    single = state_lib.create_train_state(params, state_lib.make_optimizer(vae_config()), ema=False)
    mean_grads = jax.tree.map(lambda a, b: (a + b) / 2, *(quadratic_grads(params, b) for b in batches))
    single = state_lib.apply_update(single, mean_grads, ema_decay_max=0.9, ema_warmup=10)
    np.testing.assert_allclose(accumulated.params["w"], single.params["w"], rtol=1e-6)
    assert not np.allclose(accumulated.params["w"], params["w"])


def test_ema_moves_only_on_optimizer_updates():
    config = vae_config(grad_accum_steps=2)
    state = state_lib.create_train_state({"w": jnp.ones(3)}, state_lib.make_optimizer(config), ema=True,
                                         accumulation_steps=2)  # fmt: skip
    grads = {"w": jnp.ones(3)}
    first = state_lib.apply_update(state, grads, ema_decay_max=0.9, ema_warmup=10)
    np.testing.assert_array_equal(first.ema_params["w"], state.ema_params["w"])
    second = state_lib.apply_update(first, grads, ema_decay_max=0.9, ema_warmup=10)
    # The first EMA update copies the params (decay 0, as diffusers).
    np.testing.assert_array_equal(second.ema_params["w"], second.params["w"])
    assert not np.allclose(second.params["w"], 1.0)


# ----------------------------------------------------------------------------------------------- update steps


def vae_train_step(vae, config):
    return steps.make_train_step(VAEStage().loss_fn(config, model_lib.Model({"vae": vae}, {})), config)


def jitted_step(step, state, frozen, devices, fsdp: int = 1, min_shard_size: int = parallel.MIN_SHARD_SIZE):
    """(jitted step, placed state, placed frozen params) on a ("data", "fsdp") mesh over ``devices``, as the train
    loop builds them."""
    mesh = parallel.make_mesh(fsdp=fsdp, devices=devices)
    state = jax.tree.map(np.array, state)  # a copy: the step donates its state
    state = parallel.place(state, parallel.shardings(state, mesh, min_shard_size))
    frozen = parallel.place(frozen, parallel.shardings(frozen, mesh, min_shard_size))
    return parallel.jit_train_step(step, state, frozen), state, frozen


@pytest.fixture(scope="module")
def vae_step():
    config = vae_config()
    vae = AutoencoderKL(AutoencoderKLConfig.from_dict(config.vae.to_dict()))
    params = {"vae": model_lib.init_params(vae, jax.random.key(0))}
    state = state_lib.create_train_state(params, state_lib.make_optimizer(config), ema=True)
    return vae_train_step(vae, config), state, jax.local_devices()[:1]


def test_vae_step_trains_the_vae_and_reports_psnr(vae_step):
    step, state, devices = vae_step
    batch = next(synthetic_batches(0))
    train_step, placed, frozen = jitted_step(step, state, {}, devices)
    new_state, metrics = train_step(placed, frozen, {"image": parallel.host_rows(batch["image"])}, jax.random.key(0))
    new_params = parallel.to_host(new_state.params)
    assert max_abs_diff(new_params, state.params) > 0
    assert set(metrics) == {"loss", "reconstruction", "kl", "psnr", "grad_norm"}
    assert 0 < float(metrics["psnr"]) < 20  # a random VAE reconstructs noise badly


def shapes_batch() -> np.ndarray:
    """(1, BATCH, RES, RES, 3) shapes64 images in [-1, 1], downsampled from 64x64."""
    from sdjax.shapes64.scene import example

    images = np.stack([example(0, "train", i)["image"] for i in range(BATCH)]).astype(np.float32)
    images = images.reshape(BATCH, RES, 64 // RES, RES, 64 // RES, 3).mean(axis=(2, 4))
    return (images / 127.5 - 1.0)[None]


def test_vae_loss_falls_when_overfitting_one_batch(vae_step):
    step, state, devices = vae_step
    train_step, state, frozen = jitted_step(step, state, {}, devices)
    batch = {"image": parallel.host_rows(shapes_batch())}
    rng, history = jax.random.key(0), []
    for _ in range(60):
        state, metrics = train_step(state, frozen, batch, rng)
        history.append(float(metrics["reconstruction"]))
    assert history[-1] < 0.5 * history[0], history[::10]


UPDATES_ON_1_AND_2_DEVICES = """
import json
from tests.test_train import vae_update
print(json.dumps([vae_update(n) for n in (1, 2)]))
"""


def vae_update(num_devices: int, fsdp: int = 1, min_shard_size: int = parallel.MIN_SHARD_SIZE) -> dict:
    """Metrics and params (as lists) after one stage-1 step on the first ``num_devices`` devices (``fsdp`` of them
    sharding the state), from the same init and global batch as the ``vae_step`` fixture."""
    config = vae_config()
    vae = AutoencoderKL(AutoencoderKLConfig.from_dict(config.vae.to_dict()))
    state = state_lib.create_train_state(
        {"vae": model_lib.init_params(vae, jax.random.key(0))}, state_lib.make_optimizer(config), ema=True
    )
    devices = jax.local_devices()[:num_devices]
    train_step, state, frozen = jitted_step(vae_train_step(vae, config), state, {}, devices, fsdp, min_shard_size)
    images = parallel.host_rows(next(synthetic_batches(0))["image"])
    new_state, metrics = train_step(state, frozen, {"image": images}, jax.random.key(0))
    params = jax.tree.map(lambda x: x.tolist(), parallel.to_host(new_state.params))
    return {"metrics": {k: float(v) for k, v in metrics.items()}, "params": params}


def test_one_and_two_devices_make_the_same_update(compilation_cache):
    env = {**cache_env(compilation_cache), "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    out = subprocess.run([sys.executable, "-c", UPDATES_ON_1_AND_2_DEVICES], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    one, two = json.loads(out.stdout.strip().splitlines()[-1])
    for name, value in one["metrics"].items():
        np.testing.assert_allclose(two["metrics"][name], value, rtol=1e-5, err_msg=name)
    as_arrays = lambda tree: jax.tree.map(np.asarray, tree, is_leaf=lambda x: isinstance(x, list))
    assert max_abs_diff(as_arrays(one["params"]), as_arrays(two["params"])) < 1e-6


# ----------------------------------------------------------------------------------------------- the loop


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    """An uninterrupted stage-1 run (6 steps) on synthetic data: (workdir, final state)."""
    workdir = tmp_path_factory.mktemp("vae_run")
    return workdir, loop.train_and_evaluate(vae_config(), workdir, batches_fn=synthetic_batches)


def test_sigterm_saves_a_checkpoint_and_stops_cleanly(tmp_path):
    final = loop.train_and_evaluate(
        vae_config(checkpoint_every=100), tmp_path, batches_fn=lambda p: synthetic_batches(p, sigterm_at=4)
    )
    stopped_at = int(final.step)
    assert 0 < stopped_at < 6
    assert checkpoint.Checkpoints(tmp_path).all_steps() == [stopped_at]


def test_resumed_run_reproduces_the_uninterrupted_run(vae_run, tmp_path):
    loop.train_and_evaluate(vae_config(), tmp_path, batches_fn=lambda p: synthetic_batches(p, sigterm_at=4))
    interrupted_at = checkpoint.Checkpoints(tmp_path).latest_step()
    assert interrupted_at < 6
    resumed = loop.train_and_evaluate(vae_config(), tmp_path, batches_fn=synthetic_batches)
    _, uninterrupted = vae_run
    assert int(resumed.step) == int(uninterrupted.step) == 6
    for field in ("params", "ema_params", "opt_state"):
        assert max_abs_diff(getattr(resumed, field), getattr(uninterrupted, field)) <= 1e-6, field


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(monitor.NonFiniteLossError, match="loss=nan.* at step 6.*last good checkpoint is step 4"):
        loop.train_and_evaluate(vae_config(), tmp_path, batches_fn=lambda p: synthetic_batches(p, nan_at=5))
    assert checkpoint.Checkpoints(tmp_path).all_steps() == [2, 4]
    params = checkpoint.load_trained_params(tmp_path, ema=False)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_stage1_workdir_holds_only_the_vae(vae_run):
    workdir, final = vae_run
    trained = checkpoint.load_trained_params(workdir)
    assert set(trained) == {"vae"}
    assert max_abs_diff(trained["vae"], final.ema_params["vae"]) == 0


def test_diffusion_without_stage1_workdir_names_the_command_to_run(tmp_path):
    config = load_config("shapes64")
    config.vae_path = str(tmp_path / "missing_vae")
    with pytest.raises(
        checks.TrainConfigError, match=r"train.py --config=configs/shapes64_vae.py:tiny --workdir=.*missing_vae"
    ):
        loop.train_and_evaluate(config, tmp_path / "run", batches_fn=synthetic_batches)


@pytest.fixture(scope="module")
def diffusion_run(vae_run, tmp_path_factory):
    """One stage-2 step on the stage-1 run's VAE: (workdir, config)."""
    workdir = tmp_path_factory.mktemp("diffusion_run")
    config = load_config("shapes64")
    config.update(vae_path=str(vae_run[0]), steps=1, checkpoint_every=1, async_checkpoints=False)
    loop.train_and_evaluate(config, workdir, batches_fn=synthetic_batches)
    return workdir, config


def test_diffusion_step_trains_unet_and_text_encoder(diffusion_run):
    workdir, config = diffusion_run
    model = model_lib.load_model(config, workdir / "model")
    initial = model_lib.initial_params(config, model, jax.random.fold_in(jax.random.key(config.seed), 1))
    trained = checkpoint.load_trained_params(workdir, ema=False)
    assert set(trained) == {"unet", "text_encoder"}  # the VAE stays frozen
    for name in ("unet", "text_encoder"):
        assert max_abs_diff(trained[name], initial[name]) > 0, name


def test_preview_compiles_the_sampler_once_per_run(diffusion_run):
    from sdjax import denoise

    workdir, config = diffusion_run
    config = config.copy_and_resolve_references()
    config.sample_prompts, config.sample_steps = ("a red circle on a white background",), 2
    model = model_lib.load_model(config, workdir / "model")
    draw = diffusion_stage.DiffusionStage().preview(config, model, np.zeros((1, RES, RES, 3), np.float32))
    trained = checkpoint.load_trained_params(workdir, ema=False)
    traces = denoise.TRACE_COUNT
    first = draw(trained)
    second = draw(jax.tree.map(lambda x: x * 0.5, trained))
    assert denoise.TRACE_COUNT == traces + 1  # two previews, one compile
    assert first.dtype == np.uint8 and np.abs(first.astype(int) - second.astype(int)).max() > 0


def test_diffusion_workdir_describes_a_pipeline(diffusion_run):
    workdir, config = diffusion_run
    model = workdir / "model"
    assert json.loads((model / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    assert sorted(p.name for p in (model / "unet").iterdir()) == ["config.json"]
    assert (model / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    # configs/shapes64.py's recommended sampler and guidance, which generate() and sample.py then default to.
    assert json.loads((model / "generation_config.json").read_text()) == config.generation.to_dict()


def test_new_vae_scaling_factor_is_one_over_the_latent_std(diffusion_run):
    workdir, config = diffusion_run
    vae, vae_params = load_component(workdir / "model" / "vae")
    batches = itertools.islice(synthetic_batches(0), config.scaling_batches)
    images = [b["image"].reshape(-1, RES, RES, 3) for b in batches]
    expected = 1.0 / diffusion_stage.latent_std(vae, vae_params, images)
    np.testing.assert_allclose(vae.config.scaling_factor, expected, rtol=1e-5)


def test_the_pipeline_loads_a_diffusion_workdir(diffusion_run):
    import sdjax

    workdir, _ = diffusion_run
    pipe = sdjax.StableDiffusion.from_pretrained(workdir)
    assert max_abs_diff(pipe.params["unet"], checkpoint.load_trained_params(workdir)["unet"]) == 0


def write_image_folder(folder: Path, n: int = 9) -> None:
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"picture {i}")
    (folder / "broken.png").write_bytes(b"not a png at all")
    (folder / "broken.txt").write_text("a corrupt picture")


def logged_scalars(workdir: Path, tag: str) -> list[float]:
    import tensorflow as tf

    files = sorted((workdir / "logs").glob("events.*"))
    events = [e for f in files for e in tf.compat.v1.train.summary_iterator(str(f))]
    return [v.simple_value for e in events for v in e.summary.value if v.tag == tag]


def test_corrupt_image_in_an_image_folder_is_skipped(tmp_path, data_dir):
    write_image_folder(tmp_path / "pictures")  # 9 images and a corrupt one: two batches of 8 see all ten
    config = vae_config(steps=2)
    config.data.update(source=str(tmp_path / "pictures"), data_dir=str(data_dir))
    final = loop.train_and_evaluate(config, tmp_path / "run")
    assert int(final.step) == 2
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(final.params))
    assert logged_scalars(tmp_path / "run", "train/corrupt_images_skipped")[-1] >= 1  # counts read-ahead too


def test_validation_loss_is_logged_every_eval_every_steps(tmp_path):
    """eval.jsonl holds the stage's metrics on the fixed validation batches (the EMA params) at steps 2 and 4,
    and they move as the params train."""
    config = vae_config(steps=4, eval_every=2, eval_batches=2)
    validation = lambda: synthetic_batches(10_000)  # noqa: E731 - positions training never reaches
    loop.train_and_evaluate(config, tmp_path, batches_fn=synthetic_batches, eval_batches_fn=validation)
    records = [json.loads(line) for line in (tmp_path / "logs" / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert {"loss", "reconstruction", "kl", "psnr"} <= set(records[0])
    assert all(np.isfinite(r["loss"]) for r in records) and records[0]["loss"] != records[1]["loss"]
    assert logged_scalars(tmp_path, "eval/loss") == pytest.approx([r["loss"] for r in records], rel=1e-6)


def complete_checkpoints(workdir: Path) -> list[int]:
    # Orbax renames a checkpoint to its bare step number only once it is complete.
    return [int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()]


def test_sigkilled_run_continues_from_its_last_checkpoint(tmp_path, data_dir, compilation_cache):
    config = vae_config()
    command = [sys.executable, "train.py", "--config=configs/shapes64_vae.py:tiny", f"--workdir={tmp_path}",
               f"--config.data.data_dir={data_dir}", *cli_overrides(config)]  # fmt: skip
    env = cache_env(compilation_cache)
    run = subprocess.Popen([*command, "--config.steps=100000"], cwd=REPO, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while not complete_checkpoints(tmp_path) and time.monotonic() < deadline:
            assert run.poll() is None, "train.py exited before its first checkpoint"
            time.sleep(0.2)
    finally:
        run.kill()  # SIGKILL: no handler, no final save
        run.wait()
    killed_at = max(complete_checkpoints(tmp_path))
    rerun = subprocess.run([*command, f"--config.steps={killed_at + 2}", "--alsologtostderr", "--verbose"],
                           cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from {tmp_path / 'checkpoints' / str(killed_at)} at step {killed_at}" in rerun.stderr
    assert max(complete_checkpoints(tmp_path)) == killed_at + 2


@pytest.mark.slow
def test_finetuning_trains_the_pretrained_unet_only(tmp_path, data_dir, tiny_model):
    write_image_folder(tmp_path / "pictures")
    config = load_config("sd15_finetune")
    config.pretrained_path = str(tiny_model)  # read only (the session's teardown checks it is unchanged)
    config.data.update(source=str(tmp_path / "pictures"), data_dir=str(data_dir))
    final = loop.train_and_evaluate(config, tmp_path / "run")
    assert set(final.params) == {"unet"}
    _, pretrained = load_component(tiny_model / "unet")
    assert 0 < max_abs_diff(final.params["unet"], pretrained) < 1e-3  # lr 1e-5, two steps
    _, frozen = load_component(tmp_path / "run" / "model" / "text_encoder")
    _, original = load_component(tiny_model / "text_encoder")
    assert max_abs_diff(frozen, original) == 0
