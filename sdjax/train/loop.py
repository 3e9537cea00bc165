"""The training loop of every stage: ``train_and_evaluate(config, workdir)``.

A stage (:mod:`sdjax.train.stage`: "vae" trains an ``AutoencoderKL``; "diffusion" a UNet, and optionally the text
encoder, on the latents of a frozen VAE) supplies the model folder, the loss and the preview; this module runs
it. A run is a pure function of (config, workdir contents): started again on the same workdir it restores the
latest checkpoint (params, EMA, optimizer state, step, RNG, data position) and continues as if never
interrupted. ``workdir/model/`` is written once, when a run starts on an empty workdir, and is the single source
of the model definition afterwards: resumed runs rebuild every module from it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from sdjax import checkpoint, parallel, tokenizer
from sdjax.train import checks, families, monitor, steps
from sdjax.train import model as model_lib
from sdjax.train import state as state_lib
from sdjax.train import workdir as workdir_lib
from sdjax.train.stage import Stage, close_batches, get_stage

Batches = Iterator[dict[str, np.ndarray]]
BatchesFn = Callable[[int], Batches]


def input_pipeline(
    config: ml_collections.ConfigDict,
    tok: Any,
    start: int,
    split: str | None = None,
    whole_batches: bool = False,
    **features: Any,
) -> Batches:
    """Batches {"image": (D, B, H, W, 3) float32 in [-1, 1], "input_ids": (D, B, 77) int32} for this host's D
    devices of ``split`` (default config.data.split), from batch number ``start`` on (the data position stored
    in checkpoints): this host's block of each global batch. ``whole_batches``: every row of each global batch on
    this host (D = all devices), as a one-process run reads them. Stages that read no captions get no caption
    feature read. ``features``: what the model family adds (``make_dataset``'s tokenizer_2, record_sizes: SDXL's
    second ids and micro-conditioning)."""
    from sdjax.data.input_pipeline import make_dataset  # TensorFlow is imported only by runs that read data

    d = config.data
    hosts = {"num_devices": jax.device_count(), "process_index": 0, "process_count": 1} if whole_batches else {}
    return make_dataset(
        d.source,
        split=split or d.split,
        resolution=d.resolution,
        tokenizer=tok if tok is not None else _captionless_tokenizer(),
        global_batch_size=config.batch_size,
        seed=config.seed,
        start_step=start,
        random_crop=d.random_crop,
        random_flip=d.random_flip,
        caption_dropout=d.caption_dropout,
        image_key=d.image_key,
        caption_key=d.caption_key if get_stage(config.stage).reads_captions else None,
        data_dir=d.data_dir,
        source_options={"num_train": d.get("num_train") or None},
        **{"num_devices": jax.local_device_count(), **features, **hosts},
    )


def prepare_data(config: ml_collections.ConfigDict) -> None:
    """Prepares the data source (a TFDS build into config.data.data_dir) if it is not yet. Multi-host runs call it
    on host 0 before the others open the source: hosts preparing the same directory at once collide."""
    from sdjax.data.input_pipeline import open_source

    d = config.data
    open_source(d.source, d.split, d.data_dir, d.image_key, None, {"num_train": d.get("num_train") or None})


class LoggedBatches:
    """Batches passed through, with one JSON line per batch appended to ``path``: the batch's data position,
    this host's index and a digest per example ("image" rows). It shows which examples each host reads
    (``$SDJAX_BATCH_LOG``: a folder; the multi-host test compares hosts)."""

    def __init__(self, batches: Batches, path: Path, position: int):
        self.batches, self.path, self.position = batches, path, position

    def __iter__(self) -> LoggedBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self.batches)
        images = np.asarray(batch["image"]).reshape(-1, *batch["image"].shape[2:])
        digests = [hashlib.sha256(image.tobytes()).hexdigest()[:16] for image in images]
        with open(self.path, "a") as f:
            f.write(json.dumps({"position": self.position, "process": jax.process_index(), "examples": digests}) + "\n")
        self.position += 1
        return batch

    def __getattr__(self, name: str) -> Any:  # num_corrupt_skipped, close
        return getattr(self.batches, name)


def _training_batches(config: ml_collections.ConfigDict, model: Any, batches_fn: Any, position: int) -> Batches:
    features = families.get_family(model.family).batch_options(model)
    batches = (batches_fn or (lambda p: input_pipeline(config, model.tokenizer, p, **features)))(position)
    log_dir = os.environ.get("SDJAX_BATCH_LOG")
    if not log_dir:
        return batches
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    return LoggedBatches(batches, Path(log_dir) / f"batches.{jax.process_index()}.jsonl", position)


@functools.cache
def _captionless_tokenizer() -> Any:
    # make_dataset always tokenizes; stage 1 has no captions, so any CLIP tokenizer does (its ids are unused).
    return tokenizer.build_tokenizer(["a"], tempfile.mkdtemp(prefix="sdjax_tokenizer_"))


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    batches_fn: BatchesFn | None = None,
    eval_batches_fn: Callable[[], Batches] | None = None,
    host_state: bool = True,
) -> state_lib.TrainState | None:
    """Trains ``config.stage`` in ``workdir`` up to ``config.steps`` optimizer steps, resuming from the latest
    checkpoint there, with the validation loss every ``config.eval_every`` steps.

    ``batches_fn(position)`` overrides the training input pipeline (batches as :func:`input_pipeline`) and
    ``eval_batches_fn()`` the validation batches (without it, a run with ``batches_fn`` does not evaluate).
    Returns the final state on the host (numpy leaves, gathered from every process), or None with
    ``host_state=False`` (train.py: the checkpoints hold it; a large sharded state is not gathered onto each
    host). Raises ``monitor.NonFiniteLossError`` when the loss diverges and ``checks.TrainConfigError`` on an
    unusable config.
    """
    workdir = Path(workdir).absolute()
    checks.check_config(config, batches_fn is None)
    # The lock comes before anything is read or written: a second run on the workdir is refused, and a failed
    # start removes only what this run created.
    with workdir_lib.owned(workdir, owner=jax.process_index() == 0):
        checks.check_same_model(config, workdir)
        state = _train(config, workdir, batches_fn, eval_batches_fn)
        return parallel.to_host(state) if host_state else None


def prepare_model_folder(stage: Stage, config: ml_collections.ConfigDict, folder: Path, batches_fn: Any) -> None:
    """Writes the stage's model folder for a new run, all at once: written next to ``folder`` and renamed, so
    it appears complete or not at all, even if the run is killed while writing."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    stage.write_model_folder(config, tmp, batches_fn)
    os.replace(tmp, folder)


def evaluate(eval_step: Callable, params: Any, frozen: Any, batches: list, rng: jax.Array) -> dict[str, float]:
    """Mean metrics of the jitted evaluation step over ``batches`` (this host's blocks of global batches)."""
    mesh = jax.tree.leaves(params)[0].sharding.mesh
    metrics = [parallel.to_host(eval_step(params, frozen, parallel.put_batch(b, mesh), rng)) for b in batches]
    return {k: float(np.mean([m[k] for m in metrics])) for k in metrics[0]}


def _eval_batches(config: ml_collections.ConfigDict, model: Any, batches_fn: Any, eval_batches_fn: Any) -> list:
    """The fixed validation batches (config.eval_batches of them), read once; [] when the run does not evaluate."""
    if not config.get("eval_every"):
        return []
    if eval_batches_fn is None and batches_fn is not None:
        return []
    if eval_batches_fn is not None:
        batches = eval_batches_fn()
    else:
        from sdjax.data.sources import MissingSplitError

        try:
            split, features = config.data.get("eval_split", "validation"), families.get_family(model.family)
            batches = input_pipeline(config, model.tokenizer, 0, split, **features.batch_options(model))
        except MissingSplitError as e:
            logging.warning("no validation loss: %s (set --config.data.eval_split, or eval_every=0)", e)
            return []
    try:
        return list(itertools.islice(batches, config.get("eval_batches", 4)))
    finally:
        close_batches(batches)


def _model(config: ml_collections.ConfigDict, workdir: Path, stage: Stage, batches_fn: Any) -> model_lib.Model:
    """The run's networks, from workdir/model (written first, by host 0, when the workdir is new)."""
    model_dir = workdir / checkpoint.MODEL_DIR
    if jax.process_index() == 0 and not (model_dir / "model_index.json").is_file():
        # Whole global batches: the folder (a new VAE's measured scaling factor) does not depend on the host count.
        whole = lambda tok: input_pipeline(config, tok, 0, whole_batches=True)  # noqa: E731
        first_batches = (lambda tok: batches_fn(0)) if batches_fn else whole
        prepare_model_folder(stage, config, model_dir, first_batches)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        if jax.process_index() == 0 and batches_fn is None:
            prepare_data(config)
        multihost_utils.sync_global_devices("model folder written, data prepared")
    return model_lib.load_model(config, model_dir)


@dataclasses.dataclass
class _Run:
    """What the train loop works with, once set up."""

    config: ml_collections.ConfigDict
    workdir: Path
    model: model_lib.Model
    ckpts: checkpoint.Checkpoints
    logger: monitor.Logger
    train_step: Callable
    eval_step: Callable
    frozen: Any
    preview: Callable
    batches: Batches  # global batches on the mesh
    host_batches: Batches  # this host's batches, for their counters
    eval_batches: list
    rng: jax.Array


def _train(
    config: ml_collections.ConfigDict, workdir: Path, batches_fn: BatchesFn | None, eval_batches_fn: Any
) -> state_lib.TrainState:
    stage, accum = get_stage(config.stage), config.grad_accum_steps
    heartbeat, ckpts, host_batches = monitor.Heartbeat(), None, None
    try:
        # --- Model folder (written once per workdir, by host 0) and modules.
        with heartbeat.phase("preparing the model folder"):
            model = _model(config, workdir, stage, batches_fn)

        # --- Mesh, and the train state on it: restored from the latest checkpoint, else initialised.
        mesh = parallel.mesh_from_config(config)
        ckpts = checkpoint.Checkpoints(workdir, keep=config.keep_checkpoints, async_save=config.async_checkpoints)
        restoring = ckpts.latest_step() is not None
        with heartbeat.phase("restoring a checkpoint" if restoring else "initialising the train state"):
            state, start, rng = model_lib.initial_state(config, model, ckpts, mesh)
        if jax.process_index() == 0:  # recorded once the state is there: a run that cannot start changes nothing
            (workdir / "train_config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
        if start >= config.steps:
            logging.warning("%s already holds step %d of %d: nothing to train", workdir, start, config.steps)
            return state

        # --- Update and evaluation steps (jitted over the mesh), input pipelines.
        loss_fn = stage.loss_fn(config, model)
        min_size = parallel.mesh_options(config)["min_shard_size"]
        frozen = parallel.place(model.frozen, parallel.shardings(model.frozen, mesh, min_size))
        train_step = parallel.jit_train_step(steps.make_train_step(loss_fn, config), state, frozen)
        eval_step = parallel.jit_eval_step(steps.make_eval_step(loss_fn), state.params, frozen)
        with heartbeat.phase("preparing data"):
            eval_batches = _eval_batches(config, model, batches_fn, eval_batches_fn)
            host_batches = _training_batches(config, model, batches_fn, start * accum)
            first = next(host_batches)
        preview = stage.preview(config, model, parallel.host_rows(first["image"])[: config.num_samples])
        batches = parallel.prefetch(itertools.chain([first], host_batches), mesh)
        logger = monitor.Logger(workdir, start, config.steps, config.batch_size * accum, heartbeat)
        run = _Run(config, workdir, model, ckpts, logger, train_step, eval_step, frozen, preview, batches,
                   host_batches, eval_batches, parallel.put_key(rng, mesh))  # fmt: skip
        try:
            return _loop(run, state, start)
        finally:
            logger.close()
    finally:
        heartbeat.close()
        close_batches(host_batches)
        if ckpts is not None:
            ckpts.close()


def _loop(run: _Run, state: state_lib.TrainState, start: int) -> state_lib.TrainState:
    """Steps ``start + 1`` .. config.steps: update, log, save, evaluate, preview; stops early on preemption."""
    config, logger, accum = run.config, run.logger, run.config.grad_accum_steps
    pending: list[tuple[int, dict]] = []
    with monitor.Preemption() as preemption:
        for step in range(start + 1, config.steps + 1):
            compiling = step == start + 1  # the first step compiles the update step: not part of the throughput
            with logger.heartbeat.phase("compiling the update step") if compiling else contextlib.nullcontext():
                for _ in range(accum):
                    state, metrics = run.train_step(state, run.frozen, next(run.batches), run.rng)
                    pending.append((step, metrics))
                if compiling:
                    jax.block_until_ready(metrics)
                    logger.start_clock(step)
            logger.bar.update(1)
            stop = preemption.reached(step)
            save = stop or step % config.checkpoint_every == 0 or step == config.steps
            if save or step % config.log_every == 0:
                metrics = {**monitor.check_finite(pending, run.ckpts), **monitor.data_metrics(run.host_batches)}
                logger.scalars(step, metrics)
                pending = []
            if save:
                with logger.paused("saving a checkpoint", state):
                    state_lib.save_checkpoint(run.ckpts, state, step, run.rng)
            # Evaluation and previews use the EMA params when the run keeps them: those are what gets sampled.
            params = state.ema_params if state.ema_params is not None else state.params
            if run.eval_batches and (step % config.eval_every == 0 or step == config.steps):
                with logger.paused("evaluating", state):
                    logger.evaluation(step, evaluate(run.eval_step, params, run.frozen, run.eval_batches, run.rng))
            if config.sample_every and step % config.sample_every == 0:
                with logger.paused("drawing the preview", state):
                    host_params = parallel.to_host(params)  # every process: shards may live on several
                    if jax.process_index() == 0:
                        grid = write_preview(run.preview({**run.model.frozen, **host_params}), step, run.workdir)
                        logger.image(step, grid)
            if stop:
                logging.warning("preemption requested: saved step %d, exiting", step)
                break
    return state


def write_preview(grid: np.ndarray, step: int, workdir: Path) -> np.ndarray:
    """Saves the preview grid (uint8 (H, W, 3)) as workdir/samples/<step>.png; returns it."""
    from sdjax import images

    (workdir / "samples").mkdir(exist_ok=True)
    images.save_png(grid, workdir / "samples" / f"{step}.png", {"step": str(step)})
    return grid
