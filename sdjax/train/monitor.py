"""Watching a run: preemption notices, non-finite losses, and logging (tqdm, TensorBoard, eval.jsonl)."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging

from sdjax import checkpoint, parallel


class NonFiniteLossError(FloatingPointError):
    """The loss (or gradient norm) became NaN or infinite; the run stopped without saving that state."""


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
    fetched = [(s, {k: float(v) for k, v in parallel.to_host(m).items()}) for s, m in pending]
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


def data_metrics(batches: Any) -> dict[str, float]:
    # The input pipeline counts the undecodable images it skipped; other batch iterators (tests) do not.
    skipped = getattr(batches, "num_corrupt_skipped", None)
    return {} if skipped is None else {"corrupt_images_skipped": float(skipped)}


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
        self.images_per_step, self.workdir = images_per_step, workdir
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

    def evaluation(self, step: int, metrics: dict[str, float]) -> None:
        """Validation metrics: TensorBoard ``eval/<name>`` and one JSON line in workdir/logs/eval.jsonl."""
        if not self.active:
            return
        for name, value in metrics.items():
            self.writer.add_scalar(f"eval/{name}", value, step)
        with open(self.workdir / "logs" / "eval.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        logging.info("step %d eval: %s", step, ", ".join(f"{k}={v:.5g}" for k, v in metrics.items()))

    def image(self, step: int, grid: np.ndarray) -> None:
        if self.writer is not None:
            self.writer.add_image("samples", grid, step, dataformats="HWC")

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
