"""Watching a run: preemption notices, non-finite losses, and logging (tqdm, TensorBoard, eval.jsonl)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
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


def say(line: str) -> None:
    """One line on stderr from process 0, above the progress bar when there is one."""
    if jax.process_index() == 0:
        from tqdm.auto import tqdm

        tqdm.write(line, file=sys.stderr)


class Heartbeat:
    """While a long phase runs (preparing data, compiling a step, restoring), one line every ``every`` seconds
    ("still compiling the update step, 60 s"), so a quiet run is not taken for a hung one. A daemon thread;
    ``SDJAX_HEARTBEAT_SECONDS`` sets ``every`` (default 30)."""

    def __init__(self, every: float | None = None):
        self.every = every or float(os.environ.get("SDJAX_HEARTBEAT_SECONDS", 30))
        self._phase: tuple[str, float] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sdjax-heartbeat", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def phase(self, what: str) -> Iterator[None]:
        """Reports ``what`` (e.g. "compiling the update step") while the block runs longer than ``every``."""
        previous, self._phase = self._phase, (what, time.monotonic())
        try:
            yield
        finally:
            self._phase = previous

    def _run(self) -> None:
        reported = None
        while not self._stop.wait(min(1.0, self.every / 4)):
            phase = self._phase
            if phase is None:
                continue
            elapsed = time.monotonic() - phase[1]
            beats = int(elapsed // self.every)
            if beats and (phase, beats) != reported:
                reported = (phase, beats)
                say(f"still {phase[0]}, {beats * self.every:.0f} s")

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class Logger:
    """tqdm bar (loss, steps/s, images/s) and TensorBoard event files in workdir/logs; host 0 only.

    Throughput counts training steps only: the first step (it compiles the update step) and the blocks run in
    :meth:`paused` (checkpoint saves, evaluation, previews: they compile and run other programs) are left out."""

    BAR = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"  # tqdm's own rate: compiles

    def __init__(self, workdir: Path, start: int, total: int, images_per_step: int, heartbeat: Heartbeat):
        from tqdm.auto import tqdm

        self.active = jax.process_index() == 0
        self.bar = tqdm(total=total, initial=start, disable=not self.active, dynamic_ncols=True, desc="train",
                        bar_format=self.BAR)  # fmt: skip
        self.writer = None
        if self.active:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(workdir / "logs"))
        self.images_per_step, self.workdir = images_per_step, workdir
        self.heartbeat, self.clock = heartbeat, time.perf_counter
        self.last_step, self.last_time, self.paused_time = start, None, 0.0

    def start_clock(self, step: int) -> None:
        """Throughput is measured from here (after ``step``, the compiling one, finished)."""
        self.last_step, self.last_time, self.paused_time = step, self.clock(), 0.0

    @contextlib.contextmanager
    def paused(self, what: str, state: Any) -> Iterator[None]:
        """A block that is not training (evaluation, preview): left out of the throughput, reported by the
        heartbeat when it runs long. ``state``: waited for first, so queued steps count as training."""
        jax.block_until_ready(state)
        start = self.clock()
        try:
            with self.heartbeat.phase(what):
                yield
        finally:
            self.paused_time += self.clock() - start

    def scalars(self, step: int, metrics: dict[str, float]) -> None:
        now = self.clock()
        if self.last_time is not None and step > self.last_step:
            rate = (step - self.last_step) / max(now - self.last_time - self.paused_time, 1e-9)
            metrics = {**metrics, "steps_per_s": rate, "images_per_s": rate * self.images_per_step}
            self.last_step, self.last_time, self.paused_time = step, now, 0.0
        if self.writer is not None:
            for name, value in metrics.items():
                self.writer.add_scalar(f"train/{name}", value, step)
        short = {"loss": f"{metrics['loss']:.4f}"}
        if "steps_per_s" in metrics:
            short.update({"steps/s": f"{metrics['steps_per_s']:.2f}", "img/s": f"{metrics['images_per_s']:.1f}"})
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
