"""The training loop of both stages: ``train_and_evaluate(config, workdir)``.

Stage "vae" trains an ``AutoencoderKL``; stage "diffusion" trains a UNet (and optionally the text encoder) on
the latents of a frozen VAE. A run is a pure function of (config, workdir contents): started again on the same
workdir it restores the latest checkpoint (params, EMA, optimizer state, step, RNG, data position) and continues
as if never interrupted.

``workdir/model/`` (see :mod:`sdjax.checkpoint`) is written once, when a run starts on an empty workdir, and is
the single source of the model definition afterwards: resumed runs rebuild every module from it.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import flax.jax_utils
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from sdjax import checkpoint, images, schedule, tokenizer, weights
from sdjax.train import state as state_lib
from sdjax.train import steps as steps_lib

STAGES = ("vae", "diffusion")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
Params = dict[str, Any]
Batches = Iterator[dict[str, np.ndarray]]
BatchesFn = Callable[[int], Batches]


class TrainConfigError(ValueError):
    """A training config or workdir that cannot be used; the message says what to change or run."""


class NonFiniteLossError(FloatingPointError):
    """The loss (or gradient norm) became NaN or infinite; the run stopped without saving that state."""


# ----------------------------------------------------------------------------------------------- input pipeline


def input_pipeline(config: ml_collections.ConfigDict, tok: Any, start: int) -> Batches:
    """Batches {"image": (D, B, H, W, 3) float32 in [-1, 1], "input_ids": (D, B, 77) int32} for this host's D
    devices, from batch number ``start`` on (the data position stored in checkpoints). Stage 1 reads no
    captions."""
    from sdjax.data.input_pipeline import make_dataset  # TensorFlow is imported only by runs that read data

    d = config.data
    caption_key = d.caption_key if config.stage == "diffusion" else None
    return make_dataset(
        d.source,
        split=d.split,
        resolution=d.resolution,
        tokenizer=tok if tok is not None else _captionless_tokenizer(),
        global_batch_size=config.batch_size,
        num_devices=jax.local_device_count(),
        seed=config.seed,
        start_step=start,
        random_crop=d.random_crop,
        random_flip=d.random_flip,
        caption_dropout=d.caption_dropout,
        image_key=d.image_key,
        caption_key=caption_key,
        data_dir=d.data_dir,
        source_options={"num_train": d.get("num_train") or None},
    )


@functools.cache
def _captionless_tokenizer() -> Any:
    # make_dataset always tokenizes; stage 1 has no captions, so any CLIP tokenizer does (its ids are unused).
    return tokenizer.build_tokenizer(["a"], tempfile.mkdtemp(prefix="sdjax_tokenizer_"))


# ----------------------------------------------------------------------------------------------- models


def compute_dtype(config: ml_collections.ConfigDict) -> Any:
    """The compute dtype named by ``config.dtype`` (params stay float32 either way)."""
    if config.dtype not in DTYPES:
        raise TrainConfigError(f"unknown dtype {config.dtype!r}; accepted: {', '.join(DTYPES)}")
    return DTYPES[config.dtype]


def init_params(module: Any, rng: jax.Array) -> Params:
    """Random float32 params of ``module`` (flax default initialisers), built from ``module.dummy_inputs()``."""
    return jax.jit(module.init)(rng, *module.dummy_inputs())["params"]


def _trained_components(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    if config.stage == "vae":
        return ("vae",)
    return ("unet", "text_encoder") if config.train_text_encoder else ("unet",)


def _new_tokenizer(config: ml_collections.ConfigDict, scratch: Path) -> Any:
    if config.pretrained_path:
        return tokenizer.load_tokenizer(config.pretrained_path)
    if config.tokenizer_path:
        return tokenizer.load_tokenizer(config.tokenizer_path)
    from sdjax.data import sources

    captions = sources.captions(config.data.source)
    if captions is not None:  # a synthetic source with a finite set of captions: its own small vocabulary
        return tokenizer.build_tokenizer(captions, scratch)
    raise TrainConfigError(
        f"no tokenizer for data source {config.data.source!r}: set config.tokenizer_path (a CLIP tokenizer folder) "
        "or config.pretrained_path (a diffusers Stable Diffusion folder)"
    )


def _vae_hint(config: ml_collections.ConfigDict) -> str:
    stage1 = config.get("vae_config") or "configs/shapes64_vae.py"
    command = f"python train.py --config={stage1} --workdir={config.vae_path}"
    return f"train it first with `{command}`, or set --config.vae_path to a stage-1 workdir or a diffusers VAE folder"


def _load_vae(config: ml_collections.ConfigDict) -> tuple[Any, Params, bool]:
    """(module, float32 params, new) of the stage-2 VAE; ``new`` when it comes from a stage-1 workdir."""
    if not config.vae_path and not config.pretrained_path:
        raise TrainConfigError(
            "stage 2 needs a VAE: set --config.pretrained_path (a diffusers Stable Diffusion folder) or "
            "--config.vae_path (a stage-1 workdir or a diffusers AutoencoderKL folder)"
        )
    path = Path(config.vae_path or Path(config.pretrained_path) / "vae")
    if checkpoint.is_workdir(path):
        try:
            params = checkpoint.load_trained_params(path, ema=config.vae_ema)
        except checkpoint.CheckpointError as e:
            raise TrainConfigError(f"stage-1 workdir {path} has no VAE checkpoint ({e}); {_vae_hint(config)}") from e
        if "vae" not in params:
            raise TrainConfigError(f"{path} is not a stage-1 (VAE) workdir: it trained {sorted(params)}")
        return weights.build_component(path / checkpoint.MODEL_DIR / "vae"), params["vae"], True
    for folder in (path, path / "vae"):
        if (folder / "config.json").is_file():
            module, params = weights.load_component(folder)
            return module, params, False
    raise TrainConfigError(f"no VAE at {path}; {_vae_hint(config)}")


def _scaled_vae(config: ml_collections.ConfigDict, batches_fn: Callable[[], Batches]) -> tuple[Any, Params]:
    """The frozen VAE with the ``scaling_factor`` it will be used with: config.scaling_factor if set, else
    1 / std of the latents of config.scaling_batches batches (from ``batches_fn()``) for a new VAE, else the
    VAE's own."""
    module, params, new = _load_vae(config)
    factor = config.scaling_factor
    if factor is None and new:
        batches = batches_fn()
        try:
            first = itertools.islice(batches, config.scaling_batches)
            images = [b["image"].reshape(-1, *b["image"].shape[2:]) for b in first]
        finally:
            _close(batches)
        factor = 1.0 / steps_lib.latent_std(module, params, images)
        logging.info("VAE latent scaling_factor = 1 / std = %.5f", factor)
    if factor is not None:
        module = module.clone(config=dataclasses.replace(module.config, scaling_factor=float(factor)))
    return module, params


def _scheduler_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    if config.pretrained_path:
        path = Path(config.pretrained_path) / "scheduler" / "scheduler_config.json"
        return json.loads(path.read_text())
    cfg = schedule.ScheduleConfig(**config.schedule.to_dict())  # sdjax's own config: every field explicit
    return {"_class_name": config.scheduler_class, "_diffusers_version": checkpoint.DIFFUSERS_VERSION, **cfg.to_dict()}


def _new_networks(config: ml_collections.ConfigDict, tok: Any) -> dict[str, Any]:
    """Modules of the text encoder and UNet: from config.pretrained_path, else built from config."""
    if config.pretrained_path:
        root = Path(config.pretrained_path)
        return {name: weights.build_component(root / name) for name in ("text_encoder", "unet")}
    from sdjax.models.clip import CLIPTextConfig, CLIPTextModel
    from sdjax.models.unet import UNet2DConditionConfig, UNet2DConditionModel

    text_config = CLIPTextConfig.from_dict(
        {**config.text_encoder.to_dict(), "vocab_size": len(tok), "bos_token_id": tok.bos_token_id,
         "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    )  # fmt: skip
    unet_config = UNet2DConditionConfig.from_dict(config.unet.to_dict())
    if unet_config.cross_attention_dims()[0] != text_config.hidden_size:
        raise TrainConfigError(
            f"unet.cross_attention_dim={unet_config.cross_attention_dim} must equal the text encoder's "
            f"hidden_size={text_config.hidden_size}"
        )
    return {"text_encoder": CLIPTextModel(text_config), "unet": UNet2DConditionModel(unet_config)}


def _frozen_text_encoder_params(config: ml_collections.ConfigDict) -> Params | None:
    """Params of a frozen (pretrained) text encoder; None when it is trained."""
    if config.train_text_encoder:
        return None
    if not config.pretrained_path and not config.text_encoder_path:
        raise TrainConfigError(
            "train_text_encoder=False needs a pretrained text encoder: set --config.pretrained_path or "
            "--config.text_encoder_path"
        )
    return weights.load_component(Path(config.text_encoder_path or Path(config.pretrained_path) / "text_encoder"))[1]


def prepare_model_folder(config: ml_collections.ConfigDict, folder: Path, batches_fn: Callable) -> None:
    """Writes ``folder`` (workdir/model) for a new run: configs of the trained components, weights of the frozen
    ones, tokenizer and scheduler config (stage 2). ``batches_fn(tokenizer)`` -> batches from position 0."""
    if config.stage == "vae":
        from sdjax.models.vae import AutoencoderKL, AutoencoderKLConfig

        vae = AutoencoderKL(AutoencoderKLConfig.from_dict(config.vae.to_dict()))
        checkpoint.write_model_folder(folder, {"vae": (vae, None)})
        return
    with tempfile.TemporaryDirectory() as scratch:
        tok = _new_tokenizer(config, Path(scratch))
        vae, vae_params = _scaled_vae(config, lambda: batches_fn(tok))
        networks = _new_networks(config, tok)
        components = {
            "vae": (vae, vae_params),
            "unet": (networks["unet"], None),
            "text_encoder": (networks["text_encoder"], _frozen_text_encoder_params(config)),
        }
        checkpoint.write_model_folder(folder, components, tokenizer=tok, scheduler_config=_scheduler_config(config))


def _close(batches: Any) -> None:
    # The tf.data pipeline's prefetch threads outlive an abandoned iterator unless it is closed.
    if hasattr(batches, "close"):
        batches.close()


@dataclasses.dataclass
class Model:
    """Modules (name -> flax module in the compute dtype) and frozen params (name -> params) of a run."""

    modules: dict[str, Any]
    frozen: Params
    tokenizer: Any = None
    schedule: schedule.ScheduleConfig | None = None
    scheduler_class: str = "DDIMScheduler"


def load_model(config: ml_collections.ConfigDict, folder: Path) -> Model:
    """Rebuilds the run's modules from ``folder`` (workdir/model); frozen components come with their params."""
    dtype, trained = compute_dtype(config), _trained_components(config)
    index = json.loads((folder / "model_index.json").read_text())
    modules, frozen = {}, {}
    for name in ("vae", "text_encoder", "unet"):
        if name not in index:
            continue
        if name in trained:
            modules[name] = weights.build_component(folder / name, dtype)
        else:
            modules[name], frozen[name] = weights.load_component(folder / name, dtype)
    if "unet" in modules and config.remat:
        modules["unet"] = modules["unet"].clone(remat=True)
    if "scheduler" not in index:
        return Model(modules, frozen)
    return Model(
        modules,
        frozen,
        tokenizer=tokenizer.load_tokenizer(folder / "tokenizer"),
        schedule=schedule.ScheduleConfig.from_json_file(folder / "scheduler" / "scheduler_config.json"),
        scheduler_class=index["scheduler"][1],
    )


def param_shapes(config: ml_collections.ConfigDict, model: Model) -> Params:
    """``jax.ShapeDtypeStruct`` trees of the trained components' float32 params (no init, no loading)."""
    return {
        name: weights.param_shapes(model.modules[name].clone(dtype=jnp.float32)) for name in _trained_components(config)
    }


def initial_params(config: ml_collections.ConfigDict, model: Model, rng: jax.Array) -> Params:
    """Step-0 float32 params of the trained components: config.pretrained_path's weights when set, else random."""
    params = {}
    for i, name in enumerate(_trained_components(config)):
        module = model.modules[name]
        if config.get("pretrained_path"):
            params[name] = weights.load_component(Path(config.pretrained_path) / name)[1]
        else:
            params[name] = init_params(module.clone(dtype=jnp.float32), jax.random.fold_in(rng, i))
    return params


def make_step(config: ml_collections.ConfigDict, model: Model) -> steps_lib.StepFn:
    """The per-device update step of ``config.stage``."""
    m = model.modules
    if config.stage == "vae":
        return steps_lib.make_vae_step(m["vae"], config)
    return steps_lib.make_diffusion_step(m["unet"], m["text_encoder"], m["vae"], model.schedule, config)


# ----------------------------------------------------------------------------------------------- checkpoints


def _unreplicate(tree: Any) -> Any:
    # addressable_data(0): this host's first device holds a full copy (also on multi-host pmap outputs).
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0))[0], tree)


def save_checkpoint(ckpts: checkpoint.Checkpoints, state: Any, step: int, rng: jax.Array) -> None:
    """Saves the replicated ``state`` after optimizer step ``step`` with the RNG and data position."""
    host = _unreplicate(state)
    items = {"params": host.params, "opt_state": host.opt_state}
    if host.ema_params is not None:
        items["ema_params"] = host.ema_params
    meta = {"data_position": int(host.step), "rng": np.asarray(jax.random.key_data(rng)).tolist()}
    ckpts.save(step, items, meta)


def restore_checkpoint(ckpts: checkpoint.Checkpoints, state: state_lib.TrainState) -> tuple[Any, int, jax.Array]:
    """(state, optimizer step, rng) from the latest checkpoint; ``state`` gives the structure."""
    targets = {"params": state.params, "opt_state": state.opt_state}
    if state.ema_params is not None:
        targets["ema_params"] = state.ema_params
    items, meta = ckpts.restore(targets)
    state = state.replace(step=np.int32(meta["data_position"]), **items)
    return state, int(meta["step"]), jax.random.wrap_key_data(np.asarray(meta["rng"], np.uint32))


def initial_state(
    config: ml_collections.ConfigDict, model: Model, ckpts: checkpoint.Checkpoints
) -> tuple[state_lib.TrainState, int, jax.Array]:
    """(host state, optimizer step, rng): from the latest checkpoint in ``ckpts``, else step 0 of a new run."""
    tx, ema, accum = state_lib.make_optimizer(config), config.ema_decay > 0, config.grad_accum_steps
    rng = jax.random.key(config.seed)
    if ckpts.latest_step() is None:
        params = initial_params(config, model, jax.random.fold_in(rng, 1))
        return state_lib.create_train_state(params, tx, ema=ema, accumulation_steps=accum), 0, rng
    create = lambda p: state_lib.create_train_state(p, tx, ema=ema, accumulation_steps=accum)
    state, start, rng = restore_checkpoint(ckpts, jax.eval_shape(create, param_shapes(config, model)))
    logging.info("resumed from %s at step %d", ckpts.directory / str(start), start)
    return state, start, rng


# ----------------------------------------------------------------------------------------------- loop helpers


class Preemption:
    """SIGTERM (preemption notice) -> ``requested`` becomes True; the loop then saves and exits cleanly.

    On multi-host runs the hosts agree through JAX's preemption sync point (set up by
    ``jax.distributed.initialize``), so that every host saves the same step.
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> Preemption:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, preemption then kills the run (last checkpoint)
            self._previous = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        del signum, frame
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def reached(self, step: int) -> bool:
        """Whether to save and stop after ``step``."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        return multihost_utils.reached_preemption_sync_point(step)


def check_finite(pending: list[tuple[int, dict]], ckpts: checkpoint.Checkpoints) -> dict[str, float]:
    """Fetches the pending (step, metrics) pairs; raises :class:`NonFiniteLossError` at the first step with a
    non-finite loss or gradient norm. Returns the mean of each metric."""
    fetched = [(s, {k: float(v) for k, v in _unreplicate(m).items()}) for s, m in pending]
    for step, m in fetched:
        bad = {k: v for k, v in m.items() if k in ("loss", "grad_norm") and not np.isfinite(v)}
        if bad:
            ckpts.close()  # pending saves are of earlier, finite states: let them finish
            last = ckpts.latest_step()
            raise NonFiniteLossError(
                f"non-finite {', '.join(f'{k}={v}' for k, v in bad.items())} at step {step}; stopped without saving "
                f"it. The last good checkpoint is step {last} in {ckpts.directory}"
                + ("" if last is None else " (a rerun resumes from it; lower optim.lr or raise optim.clip_grad_norm)")
            )
    return {k: float(np.mean([m[k] for _, m in fetched])) for k in fetched[0][1]} if fetched else {}


def _data_metrics(batches: Any) -> dict[str, float]:
    # The input pipeline counts the undecodable images it skipped; other batch iterators (tests) do not.
    skipped = getattr(batches, "num_corrupt_skipped", None)
    return {} if skipped is None else {"corrupt_images_skipped": float(skipped)}


def write_samples(
    config: ml_collections.ConfigDict, model: Model, params: Params, preview: np.ndarray, step: int, workdir: Path
) -> np.ndarray:
    """An image grid from ``params`` (the EMA params): VAE reconstructions of ``preview`` images (stage 1) or
    the pipeline's samples for config.sample_prompts (stage 2). Saved as workdir/samples/<step>.png; returned
    as uint8 (H, W, 3)."""
    if config.stage == "vae":
        vae = model.modules["vae"]
        recon = jax.jit(lambda p, x: vae.apply({"params": p}, x)[0])(params["vae"], preview)
        pictures = np.concatenate([preview, np.asarray(recon, np.float32)]) / 2 + 0.5
        grid = images.image_grid(np.clip(pictures, 0, 1), cols=len(preview))
    else:
        from sdjax.pipeline import StableDiffusion

        pipe = StableDiffusion(
            **model.modules, params={**model.frozen, **params}, tokenizer=model.tokenizer, schedule=model.schedule,
            scheduler_class=model.scheduler_class,
        )  # fmt: skip
        pictures = pipe.generate(
            list(config.sample_prompts), num_inference_steps=config.sample_steps,
            guidance_scale=config.sample_guidance_scale, seed=0,
        )  # fmt: skip
        grid = images.image_grid(pictures)
    (workdir / "samples").mkdir(exist_ok=True)
    images.save_png(grid, workdir / "samples" / f"{step}.png", {"step": str(step)})
    return grid


class Logger:
    """tqdm bar (loss, steps/s, images/s) and TensorBoard event files in workdir/logs; host 0 only."""

    def __init__(self, workdir: Path, start: int, total: int, images_per_step: int):
        from tqdm.auto import tqdm

        self.active = jax.process_index() == 0
        self.bar = tqdm(total=total, initial=start, disable=not self.active, dynamic_ncols=True, desc="train")
        self.writer = None
        if self.active:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(workdir / "logs"))
        self.images_per_step = images_per_step
        self.last_step, self.last_time = start, time.perf_counter()

    def scalars(self, step: int, metrics: dict[str, float]) -> None:
        now = time.perf_counter()
        rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
        self.last_step, self.last_time = step, now
        metrics = {**metrics, "steps_per_s": rate, "images_per_s": rate * self.images_per_step}
        if self.writer is not None:
            for name, value in metrics.items():
                self.writer.add_scalar(f"train/{name}", value, step)
        short = {"loss": f"{metrics['loss']:.4f}", "steps/s": f"{rate:.2f}", "img/s": f"{metrics['images_per_s']:.1f}"}
        self.bar.set_postfix(short, refresh=False)
        logging.info("step %d: %s", step, ", ".join(f"{k}={v:.5g}" for k, v in metrics.items()))

    def image(self, step: int, grid: np.ndarray) -> None:
        if self.writer is not None:
            self.writer.add_image("samples", grid, step, dataformats="HWC")

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


# ----------------------------------------------------------------------------------------------- main


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | Path, batches_fn: BatchesFn | None = None
) -> state_lib.TrainState:
    """Trains ``config.stage`` in ``workdir`` up to ``config.steps`` optimizer steps, resuming from the latest
    checkpoint there. ``batches_fn(position)`` overrides the input pipeline (batches as :func:`input_pipeline`).

    Returns the final state on the host (numpy leaves). Raises :class:`NonFiniteLossError` when the loss
    diverges and :class:`TrainConfigError` on an unusable config.
    """
    workdir = Path(workdir).absolute()
    check_config(config, batches_fn is None)
    check_same_model(config, workdir)
    created = not workdir.exists()
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        return _train(config, workdir, batches_fn)
    except BaseException:
        # A run that failed before its first checkpoint leaves no workdir behind (nothing of the user's is in it).
        checkpoints = workdir / checkpoint.CHECKPOINTS_DIR
        if created and not (checkpoints.is_dir() and any(checkpoints.iterdir())):
            shutil.rmtree(workdir, ignore_errors=True)
        raise


# Config sections that define the networks: a workdir trains one model, so these must not change on resume.
MODEL_SECTIONS = ("stage", "vae", "unet", "text_encoder", "pretrained_path", "vae_path", "text_encoder_path")


def check_config(config: ml_collections.ConfigDict, reads_data: bool = True) -> None:
    """TrainConfigError (one line) for a config that cannot train, before anything is created or loaded."""
    if config.stage not in STAGES:
        raise TrainConfigError(f"unknown stage {config.stage!r}; accepted: {', '.join(STAGES)}")
    lr = config.optim.lr
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
        raise TrainConfigError(f"optim.lr must be a finite number > 0, got {lr!r}")
    for name in ("steps", "batch_size", "grad_accum_steps"):
        value = config.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TrainConfigError(f"{name} must be an int >= 1, got {value!r}")
    if config.batch_size % jax.device_count():
        raise TrainConfigError(
            f"batch_size={config.batch_size} cannot be split evenly over {jax.device_count()} devices; use a "
            "multiple of the device count"
        )
    source = config.data.source if reads_data else None
    if isinstance(source, str) and ("/" in source or source.startswith(".")):
        if not Path(source).exists():
            raise TrainConfigError(f"data.source {source} does not exist; expected a folder of images or a TFDS name")
        if Path(source).is_dir() and not any(Path(source).iterdir()):
            raise TrainConfigError(f"data.source {source} is an empty folder; expected images with captions")


def check_same_model(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """TrainConfigError naming the differing fields when ``workdir`` was started with another model config;
    training-only fields (steps, optimizer, logging...) may change and are logged."""
    recorded = workdir / "train_config.json"
    if not recorded.is_file():
        return
    try:
        old = json.loads(recorded.read_text())
    except ValueError as e:
        raise TrainConfigError(f"{recorded} is not valid JSON ({e}); restore it or start a new workdir") from e
    new = json.loads(config.to_json_best_effort())
    changed = _differences(old, new)
    model = [k for k in changed if k.split(".")[0] in MODEL_SECTIONS]
    if model:
        raise TrainConfigError(
            f"{workdir} trains another model: {', '.join(model[:6])} differ from {recorded.name}; keep them, or "
            "use a new --workdir"
        )
    if changed:
        logging.warning("resuming %s with changed training fields: %s", workdir, ", ".join(changed[:10]))


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [d for k in keys for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


def _train(config: ml_collections.ConfigDict, workdir: Path, batches_fn: BatchesFn | None) -> state_lib.TrainState:
    accum = config.grad_accum_steps

    # --- Model folder (written once per workdir, by host 0) and modules.
    model_dir = workdir / checkpoint.MODEL_DIR
    if jax.process_index() == 0 and not (model_dir / "model_index.json").is_file():
        batches_at_start = (lambda tok: batches_fn(0)) if batches_fn else (lambda tok: input_pipeline(config, tok, 0))
        prepare_model_folder(config, model_dir, batches_at_start)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("model folder written")
    model = load_model(config, model_dir)
    if jax.process_index() == 0:
        (workdir / "train_config.json").write_text(config.to_json_best_effort(indent=2) + "\n")

    # --- Train state: restored from the latest checkpoint, else initialised.
    ckpts = checkpoint.Checkpoints(workdir, keep=config.keep_checkpoints, async_save=config.async_checkpoints)
    state, start, rng = initial_state(config, model, ckpts)
    if start >= config.steps:
        ckpts.close()
        logging.warning("%s already holds step %d of %d: nothing to train", workdir, start, config.steps)
        return state

    # --- Devices, update step and input pipeline.
    devices = jax.local_devices()
    p_step = steps_lib.pmap_step(make_step(config, model), devices)
    state = steps_lib.replicate(state, devices)
    frozen = steps_lib.replicate(model.frozen, devices)
    make_batches = batches_fn or (lambda position: input_pipeline(config, model.tokenizer, position))
    host_batches = make_batches(start * accum)
    first = next(host_batches)
    preview = first["image"].reshape(-1, *first["image"].shape[2:])[: config.num_samples]
    batches = flax.jax_utils.prefetch_to_device(itertools.chain([first], host_batches), 2, devices)

    # --- Train loop.
    logger = Logger(workdir, start, config.steps, config.batch_size * accum)
    pending: list[tuple[int, dict]] = []
    ema = state.ema_params is not None
    try:
        with Preemption() as preemption:
            for step in range(start + 1, config.steps + 1):
                for _ in range(accum):
                    state, metrics = p_step(state, frozen, next(batches), rng)
                    pending.append((step, metrics))
                logger.bar.update(1)
                stop = preemption.reached(step)
                save = stop or step % config.checkpoint_every == 0 or step == config.steps
                if save or step % config.log_every == 0:
                    logger.scalars(step, {**check_finite(pending, ckpts), **_data_metrics(host_batches)})
                    pending = []
                if save:
                    save_checkpoint(ckpts, state, step, rng)
                if config.sample_every and step % config.sample_every == 0 and jax.process_index() == 0:
                    params = state.ema_params if ema else state.params
                    logger.image(step, write_samples(config, model, _unreplicate(params), preview, step, workdir))
                if stop:
                    logging.warning("preemption requested: saved step %d, exiting", step)
                    break
    finally:
        _close(host_batches)
        ckpts.close()
        logger.close()
    return _unreplicate(state)
