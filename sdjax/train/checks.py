"""Checks that run before a training run creates or loads anything: the config, and the workdir's recorded model."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jax
import ml_collections
from absl import logging


class TrainConfigError(ValueError):
    """A training config or workdir that cannot be used; the message says what to change or run."""


# Config sections that define the networks: a workdir trains one model, so these must not change on resume.
MODEL_SECTIONS = ("stage", "vae", "unet", "text_encoder", "pretrained_path", "vae_path", "text_encoder_path", "lora")


def check_config(config: ml_collections.ConfigDict, reads_data: bool = True) -> None:
    """TrainConfigError (one line) for a config that cannot train, before anything is created or loaded."""
    from sdjax.train.stage import get_stage  # the stages import this module's error

    get_stage(config.stage)  # TrainConfigError listing the stages for an unknown one
    eval_every = config.get("eval_every", 0)
    if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 0:
        raise TrainConfigError(f"eval_every must be an int >= 0 (0: no evaluation), got {eval_every!r}")
    lr = config.optim.lr
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
        raise TrainConfigError(f"optim.lr must be a finite number > 0, got {lr!r}")
    for name in ("steps", "batch_size", "grad_accum_steps"):
        value = config.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TrainConfigError(f"{name} must be an int >= 1, got {value!r}")
    _check_mesh(config)
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


def _check_mesh(config: ml_collections.ConfigDict) -> None:
    from sdjax import parallel

    options = parallel.mesh_options(config)
    try:
        parallel.mesh_shape(options["data"], options["fsdp"], jax.device_count())
    except parallel.MeshError as e:
        raise TrainConfigError(str(e)) from e
    size = options["min_shard_size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise TrainConfigError(f"mesh.min_shard_size must be an int >= 1 (elements), got {size!r}")


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
