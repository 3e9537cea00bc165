"""LoRA training (the "lora" stage, configs/sd15_lora.py:tiny on the tiny SD 1.x model) and its export.

The loss falls; the checkpoints hold the factors and their optimizer state only; one and two devices make the same
update; a SIGKILLed train.py resumes to the params of an uninterrupted run; the exported diffusers/PEFT and kohya
files give, loaded by diffusers' ``load_lora_weights``, the images sdjax gives with the trained factors.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from flax import traverse_util

import sdjax
from sdjax import checkpoint, export, parallel
from sdjax.loading import lora, lora_export
from sdjax.train import loop, lora_stage, steps
from sdjax.train import model as model_lib
from sdjax.train import state as state_lib
from tests.reference import NEGATIVE, PROMPTS
from tests.test_train import (
    cache_env,
    compilation_cache,  # noqa: F401 - the module's shared persistent compilation cache (autouse fixture)
    complete_checkpoints,
    jitted_step,
    load_config,
    max_abs_diff,
)

REPO = Path(__file__).resolve().parents[1]
RES, BATCH, STEPS = 16, 2, 12
CAPTION = PROMPTS[0]  # DreamBooth-style: one caption for every picture of the subject


def lora_config(pretrained: Path, **overrides):
    """configs/sd15_lora.py:tiny on ``pretrained``, text encoder adapted too, a large lr (the LoRA's effect on the
    images must be large for the export test to mean something) and Adam's eps at 1e-3: the first update is
    g / (|g| + eps), which a tiny eps would make sensitive to the rounding of device-split gradient means."""
    config = load_config("sd15_lora")
    config.update(pretrained_path=str(pretrained), steps=STEPS, async_checkpoints=False, checkpoint_every=4)
    config.lora.update(text_encoder=True, alpha=8.0)
    config.optim.update(lr=1e-2, eps=1e-3)
    for key, value in overrides.items():
        config[key] = value
    return config


def fixed_batches(position: int, tokenizer):
    """The same batch at every position: BATCH noisy pictures, each captioned CAPTION."""
    from sdjax.tokenizer import tokenize

    image = np.random.default_rng(0).uniform(-1, 1, (1, BATCH, RES, RES, 3)).astype(np.float32)
    ids = np.asarray(tokenize(tokenizer, [CAPTION] * BATCH), np.int32)[None]
    while True:
        yield {"image": image, "input_ids": ids}


@pytest.fixture(scope="module")
def lora_run(tiny_model, tmp_path_factory):
    """STEPS steps on one fixed batch, the validation loss on it every step: (workdir, config, final state)."""
    from sdjax.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_model / "tokenizer")
    workdir = tmp_path_factory.mktemp("lora_run")
    config = lora_config(tiny_model, eval_every=1, eval_batches=1)
    final = loop.train_and_evaluate(
        config, workdir, batches_fn=lambda p: fixed_batches(p, tok), eval_batches_fn=lambda: fixed_batches(0, tok)
    )
    return workdir, config, final


def test_loss_falls(lora_run):
    workdir, _, _ = lora_run
    records = [json.loads(line) for line in (workdir / "logs" / "eval.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records]
    print(f"validation loss at steps 1..{STEPS}: {np.round(losses, 4).tolist()}")
    assert len(losses) == STEPS and losses[-1] < 0.9 * losses[0]
    assert sum(b < a for a, b in zip(losses, losses[1:], strict=False)) >= STEPS - 2  # falling, not noise


def lora_leaf_count(factors) -> int:
    return sum(x.size for x in jax.tree.leaves(factors))


def test_checkpoint_holds_only_the_lora_factors(lora_run, tiny_model):
    workdir, config, _ = lora_run
    trained = checkpoint.load_trained_params(workdir, ema=False)
    assert set(trained) == {"lora"} and set(trained["lora"]) == {"unet", "text_encoder"}
    rank = config.lora.rank
    for component, tree in trained["lora"].items():
        for path, value in traverse_util.flatten_dict(tree).items():
            assert path[-1] in ("down", "up"), path
            assert value.shape[0 if path[-1] == "down" else 1] == rank, (component, path, value.shape)
    model = model_lib.load_model(config, workdir / checkpoint.MODEL_DIR)
    adapted = [lora.module_name(model.modules["unet"], p) for p in lora_stage.layers(trained["lora"]["unet"])]
    suffixes = {t for name in adapted for t in config.lora.unet_targets if name.endswith("." + t)}
    assert suffixes == set(config.lora.unet_targets)  # every kind of target, and nothing else:
    assert all(any(name.endswith("." + t) for t in config.lora.unet_targets) for name in adapted)
    # The optimizer state (AdamW moments) covers the factors only: twice their size, plus scalar counts.
    ckpts = checkpoint.Checkpoints(workdir)
    try:
        step = ckpts.latest_step()
        restored = ckpts.manager.restore(step, args=ocp.args.Composite(opt_state=ocp.args.PyTreeRestore()))
    finally:
        ckpts.close()
    opt_sizes = [np.size(x) for x in jax.tree.leaves(restored["opt_state"])]
    lora_size = lora_leaf_count(trained)
    assert sum(s for s in opt_sizes if s > 1) == 2 * lora_size
    _, unet = sdjax.weights.load_component(tiny_model / "unet")
    print(f"LoRA params {lora_size:,} vs UNet {lora_leaf_count(unet):,}")
    assert lora_size < lora_leaf_count(unet) / 4


def test_resume_restores_the_lora_optimizer_state(lora_run):
    workdir, config, final = lora_run
    model = model_lib.load_model(config, workdir / checkpoint.MODEL_DIR)
    ckpts = checkpoint.Checkpoints(workdir)
    try:
        state, start, _ = model_lib.initial_state(config, model, ckpts)
    finally:
        ckpts.close()
    assert start == STEPS
    assert max_abs_diff(state.params, final.params) == 0 and max_abs_diff(state.opt_state, final.opt_state) == 0


UPDATES_ON_1_AND_2_DEVICES = """
import json, sys
from tests.test_lora_training import lora_update
print(json.dumps([lora_update(sys.argv[1], n) for n in (1, 2)]))
"""


def lora_update(model_folder: str, num_devices: int) -> dict:
    """Metrics and factors (as lists) after two LoRA steps on the first ``num_devices`` devices, from the same
    init and global batches (of 2 devices x 2 examples)."""
    from sdjax.tokenizer import load_tokenizer

    folder = Path(model_folder)
    config = lora_config(folder.parent)  # the config of lora_run (pretrained_path is not read here)
    model = model_lib.load_model(config, folder)
    stage = lora_stage.LoraStage()
    params = stage.initial_params(config, model, jax.random.key(1))
    state = state_lib.create_train_state(params, state_lib.make_optimizer(config), ema=False)
    devices = jax.local_devices()[:num_devices]
    train_step, state, frozen = jitted_step(steps.make_train_step(stage.loss_fn(config, model), config), state,
                                            model.frozen, devices)  # fmt: skip
    batches = fixed_batches(0, load_tokenizer(folder / "tokenizer"))
    for _ in range(2):
        batch = {k: parallel.host_rows(np.concatenate([v, v[:, ::-1]], axis=1)) for k, v in next(batches).items()}
        state, metrics = train_step(state, frozen, batch, jax.random.key(0))
    factors = jax.tree.map(lambda x: np.asarray(x).tolist(), parallel.to_host(state.params))
    return {"metrics": {k: float(v) for k, v in metrics.items()}, "params": factors}


@pytest.mark.slow  # two train.py / 2-device processes: 1-2 minutes on 2 shared cores
def test_one_and_two_devices_make_the_same_update(lora_run, compilation_cache):  # noqa: F811
    workdir, _, _ = lora_run
    env = {**cache_env(compilation_cache), "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    command = [sys.executable, "-c", UPDATES_ON_1_AND_2_DEVICES, str(workdir / checkpoint.MODEL_DIR)]
    out = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    one, two = json.loads(out.stdout.strip().splitlines()[-1])
    for name, value in one["metrics"].items():
        np.testing.assert_allclose(two["metrics"][name], value, rtol=1e-5, err_msg=name)
    as_arrays = lambda tree: jax.tree.map(np.asarray, tree, is_leaf=lambda x: isinstance(x, list))  # noqa: E731
    difference = max_abs_diff(as_arrays(one["params"]), as_arrays(two["params"]))
    print(f"1 vs 2 devices: max |factor difference| = {difference:.2e}")
    assert difference < 1e-6
    ups = [np.abs(np.asarray(x)).max() for x in jax.tree.leaves(as_arrays(one["params"]))]
    assert max(ups) > 0  # the factors moved


# ----------------------------------------------------------------------------------------------- resume


def write_subject_folder(folder: Path, n: int = 4) -> None:
    """A DreamBooth-style folder: ``n`` pictures of "the subject", each captioned CAPTION (name.txt)."""
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(CAPTION)


@pytest.mark.slow  # two train.py / 2-device processes: 1-2 minutes on 2 shared cores
def test_sigkilled_run_resumes_to_the_params_of_an_uninterrupted_run(tiny_model, tmp_path, compilation_cache):  # noqa: F811
    write_subject_folder(tmp_path / "subject")
    fields = {"pretrained_path": str(tiny_model), "data.source": str(tmp_path / "subject"),
              "data.data_dir": str(tmp_path / "tfds"), "checkpoint_every": 1, "async_checkpoints": False,
              "lora.text_encoder": True}  # fmt: skip
    command = [sys.executable, "train.py", "--config=configs/sd15_lora.py:tiny", f"--workdir={tmp_path / 'killed'}",
               *(f"--config.{k}={v}" for k, v in fields.items())]  # fmt: skip
    env = cache_env(compilation_cache)
    run = subprocess.Popen([*command, "--config.steps=100000"], cwd=REPO, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while not complete_checkpoints(tmp_path / "killed") and time.monotonic() < deadline:
            assert run.poll() is None, "train.py exited before its first checkpoint"
            time.sleep(0.1)
    finally:
        run.kill()  # SIGKILL: no handler, no final save
        run.wait()
    killed_at = max(complete_checkpoints(tmp_path / "killed"))
    rerun = subprocess.run([*command, f"--config.steps={killed_at + 2}", "--alsologtostderr", "--verbose"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from {tmp_path / 'killed' / 'checkpoints' / str(killed_at)} at step {killed_at}" in rerun.stderr

    config = load_config("sd15_lora")
    for key, value in fields.items():
        section, _, name = key.rpartition(".")
        (config[section] if section else config)[name] = value
    config.steps = killed_at + 2
    uninterrupted = loop.train_and_evaluate(config, tmp_path / "uninterrupted")
    resumed = checkpoint.load_trained_params(tmp_path / "killed", ema=False)
    difference = max_abs_diff(resumed, uninterrupted.params)
    print(f"killed at step {killed_at}; resumed vs uninterrupted at step {killed_at + 2}: max |diff| = {difference}")
    assert difference <= 1e-6
    assert max(np.abs(x).max() for x in jax.tree.leaves(resumed["lora"]["unet"])) > 0


# ----------------------------------------------------------------------------------------------- export

SAMPLE_STEPS, GUIDANCE = 4, 7.5


def _allow_peft_0_21() -> None:
    """As tests/test_lora.py (not imported from there: it sets a global matmul precision): transformers 5.24 asks
    for peft >= 0.22 before adding adapters to the text encoder, though peft 0.21 loads them correctly."""
    import transformers.integrations.peft as transformers_peft

    transformers_peft.check_peft_version = lambda **kwargs: None


@pytest.fixture(scope="module")
def exported(lora_run, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("export") / "lora"
    assert export.main([str(lora_run[0]), str(folder), "--lora"]) == 0
    return folder


@pytest.fixture(scope="module")
def sdjax_images(lora_run, tiny_model):
    """(latents, sdjax's images of the base model, with the trained factors merged as training merges them)."""
    workdir, config, _ = lora_run
    latents = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    pipe = sdjax.StableDiffusion.from_pretrained(tiny_model)
    kwargs = dict(num_inference_steps=SAMPLE_STEPS, guidance_scale=GUIDANCE, sampler="ddim", latents=latents)
    base = pipe.generate(PROMPTS, NEGATIVE, **kwargs)
    factors = checkpoint.load_trained_params(workdir, ema=False)["lora"]
    pipe.params = {**pipe.params, **lora_stage.merge(pipe.params, factors, lora_stage.lora_scale(config))}
    return latents, base, pipe.generate(PROMPTS, NEGATIVE, **kwargs)


@pytest.mark.parametrize("file", [lora_export.PEFT_FILE, lora_export.KOHYA_FILE])
def test_exported_lora_gives_diffusers_the_images_of_sdjax(exported, sdjax_images, tiny_torch_pipe, tiny_model, file):
    latents, base, trained = sdjax_images
    _allow_peft_0_21()
    torch_pipe = copy.deepcopy(tiny_torch_pipe)
    torch_pipe.load_lora_weights(exported / file)
    with torch.no_grad():
        expected = torch_pipe(
            PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=SAMPLE_STEPS, guidance_scale=GUIDANCE,
            latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()), output_type="np",
        ).images  # fmt: skip
    pipe = sdjax.StableDiffusion.from_pretrained(tiny_model)
    pipe.load_lora_weights(exported / file)
    loaded = pipe.generate(PROMPTS, NEGATIVE, num_inference_steps=SAMPLE_STEPS, guidance_scale=GUIDANCE,
                           sampler="ddim", latents=latents)  # fmt: skip
    error, effect = np.abs(trained - expected).max(), np.abs(trained - base).max()
    print(f"{file}: max|sdjax - diffusers| = {error:.2e}, sdjax reloaded {np.abs(loaded - trained).max():.1e}, "
          f"LoRA effect {effect:.3f}")  # fmt: skip
    assert error <= 2e-3
    assert np.abs(loaded - trained).max() <= 1e-5  # sdjax reads its own export back
    assert effect > 0.05  # a LoRA that changed nothing would pass the parity check


def test_the_pipeline_loads_a_lora_workdir_with_its_factors_merged(lora_run, sdjax_images):
    workdir, _, _ = lora_run
    latents, _, trained = sdjax_images
    pipe = sdjax.StableDiffusion.from_pretrained(workdir)
    images = pipe.generate(PROMPTS, NEGATIVE, num_inference_steps=SAMPLE_STEPS, guidance_scale=GUIDANCE,
                           sampler="ddim", latents=latents)  # fmt: skip
    assert np.abs(images - trained).max() <= 1e-5


def test_lora_export_refuses_other_workdirs_and_foreign_folders(tiny_model, lora_run, tmp_path, capsys):
    assert export.main([str(tiny_model), str(tmp_path / "out"), "--lora"]) == 2
    assert "is not a LoRA training workdir" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert export.main([str(lora_run[0]), str(tmp_path / "taken"), "--lora", "--overwrite"]) == 2
    assert "is not a LoRA export folder (notes.txt)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
