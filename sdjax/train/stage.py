"""What a training stage is, and the stages sdjax has. A new stage (e.g. LoRA) is one more module and one entry.

A stage says what it trains, how it writes the run's model folder (``DIR/model/``: configs of the trained
components, weights of the frozen ones), its loss (from which :mod:`sdjax.train.steps` builds the update and
evaluation steps) and its preview (an image grid of the current params).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import ml_collections
import numpy as np

from sdjax.train.checks import TrainConfigError
from sdjax.train.steps import LossFn

Params = dict[str, Any]
Batches = Iterator[dict[str, np.ndarray]]
Preview = Callable[[Params], np.ndarray]  # params (trained + frozen) -> uint8 image grid (H, W, 3)


class Stage(Protocol):
    """One kind of training run."""

    name: str
    reads_captions: bool  # whether its batches need "input_ids"

    def trained(self, config: ml_collections.ConfigDict) -> tuple[str, ...]:
        """Names of the components whose params the run trains (the rest are frozen)."""

    def write_model_folder(
        self, config: ml_collections.ConfigDict, folder: Path, batches_fn: Callable[[Any], Batches]
    ) -> None:
        """Writes ``folder`` for a new run; ``batches_fn(tokenizer)`` gives the training batches from position 0."""

    def loss_fn(self, config: ml_collections.ConfigDict, model: Any) -> LossFn:
        """The per-device loss of the run's :class:`sdjax.train.model.Model`."""

    def preview(self, config: ml_collections.ConfigDict, model: Any, images: np.ndarray) -> Preview:
        """A function drawing the preview grid; compiled once, on its first call. ``images``: (N, H, W, 3) in
        [-1, 1] from the first training batch."""

    # Optional: initial_params(config, model, rng) -> params, for a stage whose trained params are not the
    # networks named by trained() (LoRA factors); sdjax.train.model calls it instead of loading or initialising.


def close_batches(batches: Any) -> None:
    """Closes a batch iterator that can be closed (the tf.data pipeline's prefetch threads outlive an abandoned
    iterator otherwise)."""
    if hasattr(batches, "close"):
        batches.close()


def get_stage(name: str) -> Stage:
    """The stage called ``name``; TrainConfigError listing the stages otherwise."""
    from sdjax.train.diffusion_stage import DiffusionStage
    from sdjax.train.lora_stage import LoraStage
    from sdjax.train.vae_stage import VAEStage

    stages = {s.name: s for s in (VAEStage(), DiffusionStage(), LoraStage())}
    if name not in stages:
        raise TrainConfigError(f"unknown stage {name!r}; accepted: {', '.join(stages)}")
    return stages[name]
