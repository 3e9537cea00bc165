"""Sharded training (docs/sharding.md): the mesh and the sharding rule, the same params on 1 device, 4 data-parallel
devices and fsdp=4 after 3 steps, each device's quarter of every large array, and checkpoints of one mesh resumed
on another (fsdp=4 -> data-parallel on 4 devices, fsdp=4 -> fsdp=2 on 2 devices).

The 4- and 2-device runs are subprocesses (XLA_FLAGS=--xla_force_host_platform_device_count=N) that run
``train_and_evaluate`` on synthetic batches; the 1-device reference runs in this process. Every run writes a
checkpoint at each step, and the tests compare the checkpoints. The VAE stage runs by default; the diffusion
stage (SD and SDXL) and the LoRA stage, on the tiny diffusers folders, are ``slow``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from sdjax import checkpoint, parallel
from sdjax.train import checks, loop
from sdjax.train import model as model_lib
from tests.test_train import (
    cache_env,
    compilation_cache,  # noqa: F401 - the shared persistent compilation cache (autouse fixture)
    load_config,
    max_abs_diff,
    vae_config,
)

REPO = Path(__file__).resolve().parents[1]
STEPS, RES, BATCH = 3, 16, 8
MIN_SHARD_SIZE = 256  # the tiny models' arrays are small: a low threshold so that most of them are split
TOLERANCE = 1e-6


# ----------------------------------------------------------------------------------------------- the rule


def test_a_large_array_is_split_along_its_largest_dimension_that_fsdp_divides():
    assert parallel.partition_spec((3, 3, 320, 640), 4) == P(None, None, None, "fsdp")
    assert parallel.partition_spec((1280, 320), 4) == P("fsdp")
    assert parallel.partition_spec((640, 640), 4) == P(None, "fsdp")  # equal sizes: the last
    assert parallel.partition_spec((3, 3, 320, 6), 4) == P(None, None, "fsdp")  # 6 is not a multiple of 4


def test_small_arrays_and_arrays_fsdp_divides_nowhere_are_replicated():
    assert parallel.partition_spec((1280,), 4) == P()  # a norm scale: under min_shard_size
    assert parallel.partition_spec((), 4) == P()  # a counter
    assert parallel.partition_spec((3, 5, 4097), 4) == P()  # no dimension is a multiple of 4
    assert parallel.partition_spec((1280, 1280), 1) == P()  # fsdp=1: data parallelism, all replicated


def test_data_minus_one_takes_every_device_fsdp_leaves():
    assert parallel.mesh_shape(-1, 2, 8) == (4, 2)
    assert parallel.mesh_shape(-1, 1, 8) == (8, 1)
    assert parallel.mesh_shape(2, 4, 8) == (2, 4)


@pytest.mark.parametrize(
    ("data", "fsdp", "message"),
    [
        (-1, 3, "mesh.fsdp=3 does not divide the 8 devices"),
        (2, 2, "mesh.data=2 x mesh.fsdp=2 = 4 devices, but the run has 8"),
        (-1, 0, "mesh.fsdp must be an int >= 1"),
        (0, 1, "mesh.data must be an int >= 1 or -1"),
    ],
)
def test_mesh_sizes_the_devices_cannot_make_are_one_line(data, fsdp, message):
    with pytest.raises(parallel.MeshError, match=message):
        parallel.mesh_shape(data, fsdp, 8)


def test_a_config_whose_mesh_does_not_fit_the_devices_is_rejected_before_anything_is_made(tmp_path):
    config = vae_config()
    config.mesh.fsdp = 2  # this process has one device
    with pytest.raises(checks.TrainConfigError, match="mesh.fsdp=2 does not divide the 1 devices"):
        loop.train_and_evaluate(config, tmp_path / "run", batches_fn=lambda p: iter(()))
    assert not (tmp_path / "run").exists()


def test_the_model_folder_reads_whole_global_batches(tmp_path):
    """A new stage-2 VAE's scaling factor is measured on the first batches as one process reads them, on every
    host count: ``whole_batches`` reads every row of each global batch (here, one process: the same rows)."""
    from sdjax.tokenizer import clip_tokenizer
    from tests.test_train import write_image_folder

    write_image_folder(tmp_path / "pictures")
    config = vae_config()
    config.data.update(source=str(tmp_path / "pictures"), data_dir=str(tmp_path / "tfds"))
    batches = [loop.input_pipeline(config, clip_tokenizer(), 0, whole_batches=w) for w in (True, False)]
    try:
        whole, own = (next(b)["image"] for b in batches)
    finally:
        for b in batches:
            b.close()
    assert whole.shape == (1, BATCH, RES, RES, 3)
    np.testing.assert_array_equal(whole, own)


# ----------------------------------------------------------------------------------------------- runs


def synthetic_batches(position: int, features: dict):
    """Batch p is a pure function of p: BATCH random images in [-1, 1] and ``features`` (name -> (high, width))
    random int features, with a leading axis of 1 (the rows of one host)."""
    while True:
        rng = np.random.default_rng(position)
        batch = {"image": rng.uniform(-1, 1, (1, BATCH, RES, RES, 3)).astype(np.float32)}
        for name, (high, width) in features.items():
            batch[name] = rng.integers(0, high, (1, BATCH, width)).astype(np.int32)
        yield batch
        position += 1


def stage_setup(kind: str, folder: str | None) -> tuple:
    """(config, batch features) of one stage on a tiny model: "vae" (stage 1), "sd" (diffusion on a tiny SD
    folder), "sdxl" (diffusion on a tiny SDXL folder), "lora" (on a tiny SD folder)."""
    if kind == "vae":  # with gradient accumulation: its buffers are part of the state too
        return vae_config(steps=STEPS, checkpoint_every=1, grad_accum_steps=2), {}
    name = {"sd": "sd15_finetune", "sdxl": "sdxl_finetune", "lora": "sd15_lora"}[kind]
    config = load_config(name)
    config.update(pretrained_path=folder, steps=STEPS, checkpoint_every=1, batch_size=BATCH, async_checkpoints=False)
    config.optim.update(lr=1e-3, eps=1e-3, schedule="constant", clip_grad_norm=1.0)
    config.ema_decay = 0.9  # EMA on (its arrays are sharded too)
    features = {"input_ids": (40, 77)}  # ids below every tiny tokenizer's size
    if kind == "sdxl":
        features.update(input_ids_2=(40, 77), original_size=(32, 2), crop_top_left=(8, 2))
    return config, features


def with_mesh(config, fsdp: int, steps: int = STEPS):
    config = config.copy_and_resolve_references()
    config.mesh.update(data=-1, fsdp=fsdp, min_shard_size=MIN_SHARD_SIZE)
    config.steps = steps
    return config


def train(kind: str, folder: str | None, workdir: Path, fsdp: int, steps: int = STEPS) -> None:
    config, features = stage_setup(kind, folder)
    loop.train_and_evaluate(
        with_mesh(config, fsdp, steps), workdir, batches_fn=lambda p: synthetic_batches(p, features)
    )


def shard_report(kind: str, folder: str | None, workdir: Path, fsdp: int) -> list[dict]:
    """Per array of the train state restored from ``workdir`` onto the fsdp mesh: its path, size, partition spec
    and the size of each device's addressable shard."""
    config = with_mesh(stage_setup(kind, folder)[0], fsdp)
    model = model_lib.load_model(config, workdir / checkpoint.MODEL_DIR)
    ckpts = checkpoint.Checkpoints(workdir)
    try:
        state, _, _ = model_lib.initial_state(config, model, ckpts)
    finally:
        ckpts.close()
    report = []
    for path, x in jax.tree_util.tree_leaves_with_path((state.params, state.opt_state, state.ema_params)):
        report.append({
            "path": jax.tree_util.keystr(path), "size": int(x.size), "spec": str(x.sharding.spec),
            "shards": [int(s.data.size) for s in x.addressable_shards],
        })  # fmt: skip
    return report


def four_device_runs(kind: str, folder: str | None, root: str) -> None:
    """In a 4-device process: data-parallel and fsdp=4 runs of STEPS steps; the fsdp run's step-2 checkpoint
    resumed data-parallel (root/fsdp_to_dp) and copied for a 2-device resume (root/fsdp_to_fsdp2); root/shards.json."""
    root = Path(root)
    assert jax.device_count() == 4
    train(kind, folder, root / "dp", fsdp=1)
    train(kind, folder, root / "fsdp", fsdp=4)
    for copy in ("fsdp_to_dp", "fsdp_to_fsdp2"):
        shutil.copytree(root / "fsdp", root / copy)
        shutil.rmtree(root / copy / "checkpoints" / str(STEPS))  # the latest checkpoint is now step STEPS - 1
    train(kind, folder, root / "fsdp_to_dp", fsdp=1)
    (root / "shards.json").write_text(json.dumps(shard_report(kind, folder, root / "fsdp", 4)))


def run_devices(num_devices: int, code: str, cache: Path) -> str:
    """Runs ``code`` in a process with ``num_devices`` CPU devices and INFO logging; returns its stderr."""
    env = {**cache_env(cache), "XLA_FLAGS": f"--xla_force_host_platform_device_count={num_devices}"}
    code = f"from absl import logging; logging.set_verbosity(logging.INFO); {code}"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stderr


def layout_runs(kind: str, folder: str | None, root: Path, cache: Path) -> Path:
    """Every run of one stage: root/{one, dp, fsdp, fsdp_to_dp, fsdp_to_fsdp2} workdirs, root/shards.json and the
    subprocesses' logs root/{4,2}_devices.log."""
    args = f"{kind!r}, {folder!r}, {str(root)!r}"
    log = run_devices(4, f"from tests.test_sharding import four_device_runs; four_device_runs({args})", cache)
    (root / "4_devices.log").write_text(log)
    resume = f"train({kind!r}, {folder!r}, Path({str(root)!r}) / 'fsdp_to_fsdp2', fsdp=2)"
    log = run_devices(2, f"from tests.test_sharding import train; from pathlib import Path; {resume}", cache)
    (root / "2_devices.log").write_text(log)
    train(kind, folder, root / "one", fsdp=1)  # this process: one device
    return root


def assert_resumed(root: Path) -> None:
    """The fsdp=4 run's step STEPS - 1 checkpoint is where both resumed runs started."""
    for run, log in (("fsdp_to_dp", "4_devices.log"), ("fsdp_to_fsdp2", "2_devices.log")):
        started = f"resumed from {root / run / 'checkpoints' / str(STEPS - 1)} at step {STEPS - 1}"
        assert started in (root / log).read_text(), run


def trained(workdir: Path, ema: bool) -> dict:
    return checkpoint.load_trained_params(workdir, STEPS, ema=ema)


def assert_same_params(root: Path, runs: tuple[str, ...]) -> None:
    for ema in (False, True):
        reference = trained(root / "one", ema)
        for run in runs:
            difference = max_abs_diff(trained(root / run, ema), reference)
            print(f"{run} vs 1 device (ema={ema}): max |difference| = {difference:.2e}")
            assert difference <= TOLERANCE, (run, ema, difference)


def assert_quarter_shards(report: list[dict], most: bool = True) -> str:
    """Every array of >= MIN_SHARD_SIZE elements with a dimension 4 divides is split in quarters, one per device,
    the others replicated; with ``most``, the split ones are most of the state, Adam's moments and the EMA included."""
    large = [r for r in report if r["size"] >= MIN_SHARD_SIZE and r["spec"] != "PartitionSpec()"]
    assert len(report[0]["shards"]) == 4
    for r in large:
        assert r["shards"] == [r["size"] // 4] * 4, r
    for r in report:
        if r not in large:
            assert r["shards"] == [r["size"]] * 4, r  # replicated: a whole copy on each device
    sharded = sum(r["size"] for r in large) / sum(r["size"] for r in report)
    print(f"{len(large)} of {len(report)} arrays split in quarters: {sharded:.1%} of the state's elements")
    if not most:
        return ""
    assert sharded > 0.9
    paths = " ".join(r["path"] for r in large)
    assert ".mu" in paths and ".nu" in paths and "[2]" in paths  # Adam's moments and the EMA are split too
    return paths


# ----------------------------------------------------------------------------------------------- VAE (stage 1)


@pytest.fixture(scope="module")
def vae_runs(tmp_path_factory, compilation_cache):  # noqa: F811
    return layout_runs("vae", None, tmp_path_factory.mktemp("vae_layouts"), compilation_cache)


def test_one_device_data_parallel_and_fsdp_train_the_same_params(vae_runs):
    assert_same_params(vae_runs, ("dp", "fsdp"))


def test_each_device_holds_a_quarter_of_every_large_param_moment_and_ema_array(vae_runs):
    paths = assert_quarter_shards(json.loads((vae_runs / "shards.json").read_text()))
    assert ".acc_grads" in paths  # gradient accumulation buffers (optax.MultiSteps)


def test_an_fsdp_checkpoint_resumes_data_parallel_and_on_another_mesh(vae_runs):
    assert_resumed(vae_runs)
    assert_same_params(vae_runs, ("fsdp_to_dp", "fsdp_to_fsdp2"))


# ----------------------------------------------------------------------------------------------- other stages


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sd", "sdxl", "lora"])
def test_every_stage_trains_the_same_params_under_both_layouts(kind, tiny_model, tiny_sdxl, tmp_path,
                                                               compilation_cache):  # noqa: F811  # fmt: skip
    folder = str(tiny_sdxl[1] if kind == "sdxl" else tiny_model)
    root = layout_runs(kind, folder, tmp_path, compilation_cache)
    assert_resumed(root)
    assert_same_params(root, ("dp", "fsdp", "fsdp_to_dp", "fsdp_to_fsdp2"))
    report = json.loads((root / "shards.json").read_text())
    # LoRA: rank-4 factors, few of which reach MIN_SHARD_SIZE; what fsdp splits there is the frozen base model.
    assert_quarter_shards(report, most=kind != "lora")
