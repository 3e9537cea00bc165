"""Training checkpoints (a thin Orbax ``CheckpointManager`` wrapper) and the workdir contract with the pipeline.

A training workdir ``DIR`` holds::

    DIR/model/                 diffusers-style folder written when training starts (configs, tokenizer, scheduler,
                               and the weights of the frozen components: ``sdjax.loading.folders.write_model_folder``)
    DIR/checkpoints/<step>/    Orbax items: params, ema_params (when EMA is on), opt_state, meta (JSON: step, rng,
                               data_position)
    DIR/unreadable_checkpoints/<step>/   checkpoints that failed to restore, moved aside by a resuming run

``params`` and ``ema_params`` map a component name ("vae", "unet", "text_encoder") to its parameter tree, so
:func:`load_trained_params` reads them without knowing the optimizer. Arrays are saved as the global arrays they
are: each process writes the shards of its devices (one copy of replicated ones), nothing is gathered onto one host.
A checkpoint restores onto any mesh (another fsdp size, another device count, one CPU): each process reads
only the slices its devices hold.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

CHECKPOINTS_DIR = "checkpoints"
UNREADABLE_DIR = "unreadable_checkpoints"  # checkpoints that failed to restore, moved aside (never deleted)
MODEL_DIR = "model"
META = "meta"
# Items of one checkpoint; only "params" is required (ema_params is absent when EMA is off).
ITEMS = ("params", "ema_params", "opt_state")

Params = dict[str, Any]


class CheckpointError(ValueError):
    """A workdir or checkpoint that does not exist or does not hold what was asked for."""


class Checkpoints:
    """Saves and restores the checkpoints of one workdir, keeping the last ``keep``.

    Saves are asynchronous (training continues while files are written) and atomic: Orbax writes into a temporary
    directory and renames it when complete, so a run killed mid-save restarts from the previous checkpoint.
    """

    def __init__(self, workdir: str | Path, keep: int = 3, async_save: bool = True):
        if keep < 1:
            raise CheckpointError(f"keep={keep}: the number of checkpoints to keep must be >= 1")
        self.directory = Path(workdir).absolute() / CHECKPOINTS_DIR
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            cleanup_tmp_directories=True,  # leftovers of a save interrupted by SIGKILL
            enable_async_checkpointing=async_save,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=item_handlers())
        self._closed = False

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint, None when there is none."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        return sorted(self.manager.all_steps())

    def save(self, step: int, items: dict[str, Any], meta: dict[str, Any]) -> None:
        """Starts saving ``items`` (name -> pytree of arrays: global jax.Arrays or host numpy) and ``meta``
        (JSON-able) as ``step``. Every process of a multi-process run calls it (process 0 writes ``meta``).

        Arrays are copied to host memory before this returns, so the caller may donate or overwrite them.
        """
        unknown = set(items) - set(ITEMS)
        if unknown:
            raise CheckpointError(f"unknown checkpoint items {sorted(unknown)}; accepted: {', '.join(ITEMS)}")
        args = {name: ocp.args.PyTreeSave(tree) for name, tree in items.items()}
        args[META] = ocp.args.JsonSave({**meta, "step": int(step)})
        self.manager.save(int(step), args=ocp.args.Composite(**args), force=True)

    def restore(self, targets: dict[str, Any], step: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restores the items named in ``targets`` (name -> pytree giving the structure) from ``step`` (default:
        the latest). Leaves that carry a sharding (``jax.ShapeDtypeStruct(..., sharding=s)``, jax.Arrays) restore
        as global arrays with that sharding; others as host numpy arrays. Returns (items, meta dict)."""
        step = self.latest_step() if step is None else step
        if step is None or step not in self.manager.all_steps():
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; found: {self.all_steps()}")
        args = {name: _restore_args(_host_structure(tree)) for name, tree in targets.items()}
        restored = self.manager.restore(step, args=ocp.args.Composite(**args, **{META: ocp.args.JsonRestore()}))
        return {name: restored[name] for name in targets}, dict(restored[META])

    def set_aside(self, step: int) -> Path:
        """Moves checkpoint ``step`` (one that does not restore) to ``DIR/unreadable_checkpoints/<step>``, out of
        Orbax's sight: the run can save that step again, and the files stay for inspection. Returns the new path.
        Process 0 moves it; every process then sees the remaining steps."""
        target = self.directory.parent / UNREADABLE_DIR / str(step)
        if jax.process_index() == 0:
            target.parent.mkdir(exist_ok=True)
            n = 1
            while target.exists():  # the same step set aside before: keep both
                target, n = target.with_name(f"{step}.{n}"), n + 1
            (self.directory / str(step)).rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"checkpoint {step} set aside")
        self.manager.reload()
        return target

    def has_item(self, name: str, step: int) -> bool:
        """Whether checkpoint ``step`` holds item ``name``."""
        return (self.directory / str(step) / name).is_dir()

    def wait(self) -> None:
        """Blocks until pending saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager's threads (idempotent)."""
        if not self._closed:
            self._closed = True
            try:
                self.manager.wait_until_finished()  # raises a failed background save's error
            finally:
                self.manager.close()


def item_handlers() -> dict[str, Any]:
    """Orbax handlers of a checkpoint's items. Arrays are written by the first replica of each shard: a replicated
    array once, by process 0 (Orbax's default, replica-parallel writing, would split it over every process that
    holds a copy); a sharded one by the processes that hold its shards."""
    handlers = [(t, ocp.type_handlers.get_type_handler(t)) for t in (int, float, bytes, np.number, np.ndarray, str)]
    arrays = ocp.type_handlers.ArrayHandler(use_replica_parallel=False)
    registry = ocp.type_handlers.create_type_handler_registry(*handlers, (jax.Array, arrays))
    trees = {name: ocp.PyTreeCheckpointHandler(type_handler_registry=registry) for name in ITEMS}
    return {**trees, META: ocp.JsonCheckpointHandler()}


def _restore_args(target: Any) -> Any:
    # Per leaf: a jax.Array on the target's sharding, or a numpy array.
    return ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))


def _host_structure(tree: Any) -> Any:
    # Sharded targets restore onto their shardings; numpy leaves make Orbax restore numpy arrays, whatever devices
    # (and sharding) the checkpoint was saved from (np.zeros is lazily allocated: a shape, not memory).
    def target(x: Any) -> Any:
        sharding = getattr(x, "sharding", None)
        if sharding is not None:
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
        return np.zeros(x.shape, x.dtype)

    return jax.tree.map(target, tree)


def is_workdir(path: str | Path) -> bool:
    """Whether ``path`` is an sdjax training workdir: it has ``model/model_index.json`` and ``checkpoints/``."""
    path = Path(path)
    return (path / MODEL_DIR / "model_index.json").is_file() and (path / CHECKPOINTS_DIR).is_dir()


def load_trained_params(workdir: str | Path, step: int | None = None, ema: bool = True) -> dict[str, Params]:
    """Parameters of the components a workdir trained, from checkpoint ``step`` (default: the latest).

    Returns component name ("vae" for a stage-1 workdir; "unet" and, when trained, "text_encoder" otherwise) ->
    float32 numpy parameter tree, the EMA params when ``ema`` and the run kept them. The pipeline combines these
    with ``workdir/model/`` (configs and the frozen components' weights).

    Reading is this process's alone (no barrier with other processes), whatever mesh wrote the checkpoint: one
    host of a multi-host run may load a workdir while the others do something else.
    """
    workdir = Path(workdir)
    if not is_workdir(workdir):
        raise CheckpointError(f"{workdir} is not an sdjax workdir (expected model/model_index.json and checkpoints/)")
    manager = _local_reader((workdir / CHECKPOINTS_DIR).absolute())  # Orbax reads absolute paths only
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            raise CheckpointError(f"{workdir} has no complete checkpoint yet in {workdir / CHECKPOINTS_DIR}")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise CheckpointError(f"{workdir} has no checkpoint for step {step}; available steps: {steps}")
        item = "ema_params" if ema and (workdir / CHECKPOINTS_DIR / str(step) / "ema_params").is_dir() else "params"
        metadata = manager.item_metadata(step)[item]
        target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), _tree(metadata))
        restored = manager.restore(step, args=ocp.args.Composite(**{item: _restore_args(target)}))
        return jax.tree.map(np.asarray, dict(restored[item]))
    finally:
        manager.close()


def _local_reader(directory: Path) -> ocp.CheckpointManager:
    # A read-only manager of this process alone: Orbax skips its cross-process barriers when the only active process
    # is this one (a CheckpointManager of every process would wait for the others at its first barrier).
    me = jax.process_index()
    # Not read_only: Orbax logs a warning for read-only managers; this one only reads (nothing is written on open).
    options = ocp.CheckpointManagerOptions(
        create=False,
        multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me}),
    )
    return ocp.CheckpointManager(directory, options=options, item_handlers=item_handlers())


def _tree(metadata: Any) -> Any:
    # Orbax item metadata: a tree of ArrayMetadata (shape, dtype), possibly wrapped in a metadata object.
    tree = getattr(metadata, "tree", metadata)
    return dict(tree) if isinstance(tree, dict) else tree
