"""SDXL fine-tuning (configs/sdxl_finetune.py on the tiny SDXL folder): the input pipeline's micro-conditioning,
one update step's loss against diffusers' UNet2DConditionModel (PyTorch) on the very arrays sdjax drew, the same
update on 1 and 2 devices, and a train.py run whose workdir loads as a StableDiffusionXL.

The PyTorch side follows diffusers' examples/text_to_image/train_text_to_image_sdxl.py: penultimate hidden states
of both encoders concatenated, the second one's text_embeds, time ids original_size + crop_top_left + target_size,
DDPMScheduler.add_noise, epsilon target, F.mse_loss.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sdjax import parallel
from sdjax.train import diffusion_stage, steps
from sdjax.train import model as model_lib
from sdjax.train import state as state_lib
from tests.test_train import jitted_step

REPO = Path(__file__).resolve().parents[1]
RES = 16  # the :tiny config's resolution
# (height, width) of the training pictures: portrait, landscape, square; all larger than RES so crops move.
SIZES = [(20, 28), (32, 20), (24, 24), (18, 40)]
CAPTIONS = ["a red circle on a blue background", "photo of a cat", "blurry", "a yellow triangle"]


def sdxl_config(folder: Path, pictures: Path, data_dir: Path, **overrides):
    spec = importlib.util.spec_from_file_location("sdxl_finetune", REPO / "configs" / "sdxl_finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("tiny")
    config.pretrained_path = str(folder)
    config.data.update(source=str(pictures), data_dir=str(data_dir))
    config.async_checkpoints = False
    for key, value in overrides.items():
        config[key] = value
    return config


def write_pictures(folder: Path) -> None:
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, ((h, w), caption) in enumerate(zip(SIZES, CAPTIONS, strict=True)):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sdxl_pictures") / "pictures"
    write_pictures(folder)
    return folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sdxl_tfds")


def first_batch(config, model, num_devices: int = 1, **overrides) -> dict[str, np.ndarray]:
    """The first training batch of ``config`` as the loop reads it (the model family's features included)."""
    from sdjax.data.input_pipeline import make_dataset
    from sdjax.train import families

    d = config.data
    features = families.get_family(model.family).batch_options(model)
    args = dict(
        split="train", resolution=d.resolution, tokenizer=model.tokenizer, global_batch_size=config.batch_size,
        num_devices=num_devices, seed=config.seed, random_crop=d.random_crop, random_flip=d.random_flip,
        caption_dropout=d.caption_dropout, data_dir=d.data_dir, process_index=0, process_count=1, **features,
    )  # fmt: skip
    with make_dataset(d.source, **{**args, **overrides}) as batches:
        return next(batches)


# ----------------------------------------------------------------------------------------------- input pipeline


def sizes_batch(pictures: Path, data_dir: Path, tok, seed: int = 0, **augmentation) -> dict[str, np.ndarray]:
    """All four pictures in one batch (their order shuffled), with their recorded sizes."""
    from sdjax.data.input_pipeline import make_dataset

    pipeline = make_dataset(
        str(pictures), resolution=RES, tokenizer=tok, global_batch_size=4, num_devices=1, seed=seed,
        data_dir=str(data_dir), process_index=0, process_count=1, record_sizes=True, **augmentation,
    )  # fmt: skip
    with pipeline:
        return jax.tree.map(lambda x: x[0], next(pipeline))


def resized(image: np.ndarray) -> np.ndarray:
    """What the pipeline resizes a (h, w, 3) uint8 picture to before cropping, in [0, 255]."""
    import tensorflow as tf

    h, w = image.shape[:2]
    scale = RES / min(h, w)
    size = [max(round(h * scale), RES), max(round(w * scale), RES)]
    return tf.image.resize(image, size, method="bilinear", antialias=True).numpy()


def picture_of(pictures: Path, original_size: np.ndarray) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(pictures / f"{SIZES.index(tuple(original_size))}.png"))


def test_pipeline_records_each_examples_original_size_and_centre_crop(pictures, data_dir, tiny_sdxl):
    from sdjax import tokenizer

    batch = sizes_batch(pictures, data_dir, tokenizer.load_tokenizer(tiny_sdxl[1] / "tokenizer"))
    assert batch["original_size"].dtype == np.int32 and batch["crop_top_left"].dtype == np.int32
    assert sorted(map(tuple, batch["original_size"])) == sorted(SIZES)
    for size, top_left in zip(batch["original_size"], batch["crop_top_left"], strict=True):
        new = resized(picture_of(pictures, size)).shape[:2]
        # diffusers' centre crop: y1 = round((height - resolution) / 2), x1 likewise
        assert tuple(top_left) == (round((new[0] - RES) / 2), round((new[1] - RES) / 2))


def test_random_crop_corner_is_in_the_flipped_resized_image(pictures, data_dir, tiny_sdxl):
    """diffusers' SDXL script flips before cropping: the recorded corner locates the example in the flipped image."""
    from sdjax import tokenizer

    tok = tokenizer.load_tokenizer(tiny_sdxl[1] / "tokenizer")
    batch = sizes_batch(pictures, data_dir, tok, random_crop=True, random_flip=True)
    flipped = 0
    for image, size, (top, left) in zip(batch["image"], batch["original_size"], batch["crop_top_left"], strict=True):
        full = resized(picture_of(pictures, size))
        crops = {
            "plain": full[top : top + RES, left : left + RES],
            "flipped": full[:, ::-1][top : top + RES, left : left + RES],
        }
        errors = {name: np.abs(crop / 127.5 - 1 - image).max() for name, crop in crops.items()}
        assert min(errors.values()) < 1e-4, errors
        flipped += errors["flipped"] < errors["plain"]
    assert 0 < flipped < 4  # both cases were checked (seed 0 flips two)


# ----------------------------------------------------------------------------------------------- one step vs diffusers


@pytest.fixture(scope="module")
def sdxl_step(tiny_sdxl, pictures, data_dir):
    """The loss of the first update step on the tiny SDXL folder (the stage's loss_fn, which the update step
    differentiates, on the step's params, frozen params, batch, rng and step 0) and the arrays it was computed
    from (the stage's ``training_inputs``: latents, noise, timesteps, conditions), in one program:
    (config, model, batch, metrics, inputs)."""
    _, folder = tiny_sdxl
    config = sdxl_config(folder, pictures, data_dir, batch_size=4)
    config.data.caption_dropout = 0.5  # some captions dropped: their embeddings are zeros
    model = model_lib.load_model(config, folder)
    params = model_lib.initial_params(config, model, jax.random.key(1))
    batch = first_batch(config, model)
    stage = diffusion_stage.DiffusionStage()
    loss_fn, inputs_fn = stage.loss_fn(config, model), stage.training_inputs(config, model)

    def step(params, frozen, batch, rng, step):
        return loss_fn(params, frozen, batch, rng, step)[1], inputs_fn(params, frozen, batch, rng, step)

    rows = {k: parallel.host_rows(v) for k, v in batch.items()}
    metrics, inputs = jax.jit(step)(params, model.frozen, rows, jax.random.key(config.seed), jnp.int32(0))
    return config, model, batch, parallel.to_host(metrics), parallel.to_host(inputs)


def diffusers_loss(torch_pipe, folder: Path, batch: dict, inputs: dict) -> tuple[float, dict]:
    """train_text_to_image_sdxl.py's loss on sdjax's latents, noise and timesteps, from the batch's token ids and
    recorded sizes; also returns the PyTorch conditioning."""
    from diffusers import DDPMScheduler

    ids = [torch.from_numpy(np.asarray(batch[k][0], np.int64)) for k in ("input_ids", "input_ids_2")]
    with torch.no_grad():
        first = torch_pipe.text_encoder(ids[0], output_hidden_states=True)
        second = torch_pipe.text_encoder_2(ids[1], output_hidden_states=True)
        states = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        pooled = second.text_embeds
        # force_zeros_for_empty_prompt: a dropped caption's conditioning is zeros
        dropped = torch.from_numpy(np.asarray(inputs["dropped"]))
        states, pooled = states.masked_fill(dropped[:, None, None], 0.0), pooled.masked_fill(dropped[:, None], 0.0)
        time_ids = torch.tensor(
            [list(o) + list(c) + [RES, RES] for o, c in zip(batch["original_size"][0], batch["crop_top_left"][0],
                                                             strict=True)], dtype=torch.float32,
        )  # fmt: skip
        scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
        nchw = lambda x: torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2)  # noqa: E731
        latents, noise, t = nchw(inputs["x0"]), nchw(inputs["noise"]), torch.from_numpy(np.asarray(inputs["t"]))
        noisy = scheduler.add_noise(latents, noise, t)
        added = {"text_embeds": pooled, "time_ids": time_ids}
        prediction = torch_pipe.unet(noisy, t, states, added_cond_kwargs=added, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(prediction.float(), noise.float(), reduction="mean")
    return float(loss), {"encoder_hidden_states": states, "text_embeds": pooled, "time_ids": time_ids}


def test_one_step_loss_equals_diffusers_sdxl_training_loss(sdxl_step, tiny_sdxl):
    from sdjax.train import families

    config, model, batch, metrics, inputs = sdxl_step
    dropped = np.asarray(families.empty_captions(model, jnp.asarray(batch["input_ids"][0])))
    assert 0 < dropped.sum() < len(dropped)  # caption dropout 0.5 on 4 examples (seed 0) drops some, not all
    expected, torch_conditions = diffusers_loss(*tiny_sdxl, batch, {**inputs, "dropped": dropped})
    for name, value in torch_conditions.items():
        np.testing.assert_allclose(inputs["conditions"][name], value.numpy(), atol=2e-5, err_msg=name)
    assert abs(float(metrics["loss"]) - expected) / expected < 1e-5, (float(metrics["loss"]), expected)


def test_sdxl_models_take_their_family_conditioning_and_options(sdxl_step, tiny_sdxl):
    config, model, _, _, _ = sdxl_step
    assert model.family == "sdxl" and model.options["force_zeros_for_empty_prompt"] is True
    assert set(model.frozen) == {"vae", "text_encoder", "text_encoder_2"}
    config = config.copy_and_resolve_references()
    config.update(dtype="bfloat16", remat=True)
    bf16 = model_lib.load_model(config, tiny_sdxl[1])
    assert bf16.modules["unet"].remat and bf16.modules["unet"].dtype == jnp.bfloat16
    assert bf16.modules["vae"].dtype == jnp.float32  # force_upcast: the SDXL VAE encodes in float32
    assert jax.tree.leaves(bf16.frozen["text_encoder_2"])[0].dtype == jnp.bfloat16


@pytest.mark.slow
def test_bfloat16_remat_update_step_is_close_to_the_float32_loss(sdxl_step, tiny_sdxl):
    config, _, batch, metrics, _ = sdxl_step
    config = config.copy_and_resolve_references()
    config.update(dtype="bfloat16", remat=True)
    model = model_lib.load_model(config, tiny_sdxl[1])
    params = model_lib.initial_params(config, model, jax.random.key(1))
    state = state_lib.create_train_state(params, state_lib.make_optimizer(config), ema=False)
    loss_fn = diffusion_stage.DiffusionStage().loss_fn(config, model)
    step = steps.make_train_step(loss_fn, config)
    train_step, placed, frozen = jitted_step(step, state, model.frozen, jax.local_devices()[:1])
    rows = {k: parallel.host_rows(v) for k, v in batch.items()}
    new_state, bf16 = train_step(placed, frozen, rows, jax.random.key(config.seed))
    new_params = parallel.to_host(new_state.params)
    assert jax.tree.leaves(new_params)[0].dtype == np.float32  # float32 master weights
    assert abs(float(bf16["loss"]) - float(metrics["loss"])) < 2e-2 * float(metrics["loss"])
    assert 0 < max_abs_diff(new_params, params) < 1e-4


# ----------------------------------------------------------------------------------------------- devices, train.py


UPDATES_ON_1_AND_2_DEVICES = """
import json, sys
from pathlib import Path
from tests.test_sdxl_train import sdxl_update
folder, pictures, data_dir = map(Path, sys.argv[1:4])
print(json.dumps([sdxl_update(n, folder, pictures, data_dir) for n in (1, 2)]))
"""


def sdxl_update(num_devices: int, folder: Path, pictures: Path, data_dir: Path) -> dict:
    """Loss and UNet params (as lists) after one step of the tiny config on ``num_devices`` devices."""
    config = sdxl_config(folder, pictures, data_dir)
    config.optim.eps = 1e-3  # see tests/test_train.py: Adam's g / (|g| + eps) would amplify rounding where |g| ~ eps
    model = model_lib.load_model(config, folder)
    state = state_lib.create_train_state(
        model_lib.initial_params(config, model, jax.random.key(1)), state_lib.make_optimizer(config), ema=False
    )
    loss_fn = diffusion_stage.DiffusionStage().loss_fn(config, model)
    step = steps.make_train_step(loss_fn, config)
    train_step, state, frozen = jitted_step(step, state, model.frozen, jax.local_devices()[:num_devices])
    batch = {k: parallel.host_rows(v) for k, v in first_batch(config, model, num_devices).items()}
    new_state, metrics = train_step(state, frozen, batch, jax.random.key(0))
    params = jax.tree.map(lambda x: x.tolist(), parallel.to_host(new_state.params))
    return {"metrics": {k: float(v) for k, v in metrics.items()}, "params": params}


def max_abs_diff(a, b) -> float:
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in pairs)


@pytest.mark.slow
def test_one_and_two_devices_make_the_same_sdxl_update(tiny_sdxl, pictures, data_dir):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    command = [sys.executable, "-c", UPDATES_ON_1_AND_2_DEVICES, str(tiny_sdxl[1]), str(pictures), str(data_dir)]
    out = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    one, two = json.loads(out.stdout.strip().splitlines()[-1])
    for name, value in one["metrics"].items():
        np.testing.assert_allclose(two["metrics"][name], value, rtol=1e-5, err_msg=name)
    as_arrays = lambda tree: jax.tree.map(np.asarray, tree, is_leaf=lambda x: isinstance(x, list))  # noqa: E731
    assert max_abs_diff(as_arrays(one["params"]), as_arrays(two["params"])) < 1e-6


@pytest.mark.slow
def test_train_py_workdir_loads_as_stable_diffusion_xl_and_samples(tiny_sdxl, pictures, data_dir, tmp_path):
    import sdjax
    from sdjax import checkpoint, weights

    workdir = tmp_path / "run"
    command = [sys.executable, "train.py", "--config=configs/sdxl_finetune.py:tiny", f"--workdir={workdir}",
               f"--config.pretrained_path={tiny_sdxl[1]}", f"--config.data.source={pictures}",
               f"--config.data.data_dir={data_dir}", "--config.async_checkpoints=False",
               "--nocompile_cache"]  # fmt: skip
    run = subprocess.run(command, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True,
                         text=True, timeout=900)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    index = json.loads((workdir / "model" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["_sdjax_trained"] == ["unet"]
    pipe = sdjax.from_pretrained(workdir)
    assert isinstance(pipe, sdjax.StableDiffusionXL)
    trained = checkpoint.load_trained_params(workdir)["unet"]
    _, pretrained = weights.load_component(tiny_sdxl[1] / "unet")
    assert max_abs_diff(pipe.params["unet"], trained) == 0 and 0 < max_abs_diff(trained, pretrained) < 1e-4
    images = pipe.generate(["a red circle on a blue background"], num_inference_steps=2, height=RES, width=RES)
    assert images.shape == (1, RES, RES, 3) and np.isfinite(images).all()
