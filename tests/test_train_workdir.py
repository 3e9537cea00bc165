"""Workdir faults: one run at a time (the lock), a failed start cleans only its own files, a corrupt newest
checkpoint, a full disk. Each feeds the fault, checks the one line, and checks what is (and is not) on disk."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from sdjax import checkpoint
from sdjax.train import loop
from sdjax.train import state as state_lib
from sdjax.train import workdir as workdir_lib
from tests import test_train
from tests.test_train import REPO, cache_env, complete_checkpoints, max_abs_diff, synthetic_batches, vae_config

# test_train's fixtures: the module-wide persistent compilation cache (autouse, also for subprocesses), TFDS data.
compilation_cache, data_dir = test_train.compilation_cache, test_train.data_dir

TINY = ["train.py", "--config=configs/shapes64_vae.py:tiny", "--config.async_checkpoints=False"]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``folder`` with its size and mtime: what a refused or failed run must leave unchanged."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


HOLDER = """
import sys, time
from pathlib import Path
from sdjax.train import workdir
with workdir.owned(Path(sys.argv[1])) as w:
    (w.path / "mine.txt").write_text("the holder's")
    print("locked", flush=True)
    time.sleep(600)
"""


def start_holder(path: Path) -> subprocess.Popen:
    """A process holding ``path``'s lock (as a run does), once it printed "locked"."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_run_is_refused_naming_the_holder_and_deletes_nothing(tmp_path, compilation_cache):
    workdir = tmp_path / "new"  # created by the holder: the refused run must not remove it (its failed start)
    holder = start_holder(workdir)
    try:
        before = snapshot(workdir)
        out = subprocess.run([sys.executable, *TINY, f"--workdir={workdir}"], cwd=REPO,
                             env=cache_env(compilation_cache), capture_output=True, text=True, timeout=300)  # fmt: skip
        assert out.returncode == 1
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert lines == [
            f"train.py: WorkdirBusyError: workdir {workdir} is in use by another train.py (pid {holder.pid} on "
            f"{socket.gethostname()}); wait for it to end or stop it, or use another --workdir"
        ], out.stderr
        assert snapshot(workdir) == before
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path, caplog):
    holder = start_holder(tmp_path / "w")
    holder.send_signal(signal.SIGKILL)  # no clean-up: the lock file keeps its pid, the kernel drops the flock
    holder.wait()
    lock = tmp_path / "w" / workdir_lib.LOCK_FILE
    assert lock.read_text().split()[0] == str(holder.pid)
    with caplog.at_level(logging.WARNING), workdir_lib.owned(tmp_path / "w"):
        assert lock.read_text().split()[0] == str(os.getpid())
    assert lock.read_text() == ""  # released: no pid left to report as stale
    assert f"took over {lock} from a run that ended without releasing it ({holder.pid} " in caplog.text
    assert (tmp_path / "w" / "mine.txt").read_text() == "the holder's"


def test_a_failed_start_removes_only_what_it_created(tmp_path, monkeypatch):
    def fail(*args, **kwargs):  # after the model folder and checkpoints/ were written
        raise RuntimeError("the state broke")

    at_lock, take_lock = [], workdir_lib.Workdir._take_lock

    def record(self):
        at_lock.append(sorted(p.name for p in self.path.iterdir()))
        return take_lock(self)

    monkeypatch.setattr(loop.model_lib, "initial_state", fail)
    monkeypatch.setattr(workdir_lib.Workdir, "_take_lock", record)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    before = snapshot(existing)
    for workdir in (existing, tmp_path / "new"):
        with pytest.raises(RuntimeError, match="the state broke"):
            loop.train_and_evaluate(vae_config(), workdir, batches_fn=synthetic_batches)
    assert snapshot(existing) == before  # model/, checkpoints/, train_config.json and the lock file are gone
    assert not (tmp_path / "new").exists()
    assert at_lock == [["notes.txt"], []]  # the lock comes before anything the run writes


@pytest.mark.slow
def test_two_runs_started_at_once_on_a_new_workdir_one_trains(tmp_path, data_dir, compilation_cache):
    workdir = tmp_path / "shared"
    command = [sys.executable, *TINY, f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", "--config.steps=4",
               "--config.checkpoint_every=2"]  # fmt: skip
    runs = [subprocess.Popen(command, cwd=REPO, env=cache_env(compilation_cache), stderr=subprocess.PIPE, text=True)
            for _ in range(2)]  # fmt: skip
    results = [(run.wait(timeout=600), run.stderr.read()) for run in runs]
    assert sorted(code for code, _ in results) == [0, 1], results
    refused = next(err for code, err in results if code == 1)
    assert refused.strip().splitlines()[-1].startswith(f"train.py: WorkdirBusyError: workdir {workdir} is in use")
    assert complete_checkpoints(workdir) == [2, 4]
    assert set(checkpoint.load_trained_params(workdir)) == {"vae"}


# ------------------------------------------------------------------------------------------- checkpoints


def truncate_a_data_file(step_dir: Path) -> Path:
    """Truncates the largest array data file of checkpoint ``step_dir``'s params to 100 bytes; returns it."""
    data = max((step_dir / "params").glob("ocdbt.process_*/d/*"), key=lambda p: p.stat().st_size)
    os.truncate(data, 100)
    return data


def small_run(workdir: Path, steps=(1, 2, 3)) -> tuple[checkpoint.Checkpoints, state_lib.TrainState]:
    """Checkpoints of a small state (bias = the step number) at ``steps``; returns the manager and a target."""
    ckpts = checkpoint.Checkpoints(workdir, async_save=False)
    for step in steps:
        rng = np.random.default_rng(step)  # random values: compressed constants would be too small to damage
        params = {"vae": {"kernel": rng.normal(size=(64, 64)).astype(np.float32), "bias": np.full(8, step, np.float32)}}
        state = state_lib.create_train_state(params, optax.adam(1e-3), ema=True)
        state_lib.save_checkpoint(ckpts, state.replace(step=step), step, jax.random.key(step))
    return ckpts, state


def test_a_corrupt_newest_checkpoint_is_moved_aside_with_one_warning(tmp_path, caplog):
    ckpts, target = small_run(tmp_path)
    truncated = truncate_a_data_file(tmp_path / "checkpoints" / "3")
    with caplog.at_level(logging.WARNING):
        state, step, _ = state_lib.restore_newest(ckpts, target)
    assert step == 2 and float(state.params["vae"]["bias"][0]) == 2.0
    aside = tmp_path / "unreadable_checkpoints" / "3"
    warnings = [r.getMessage() for r in caplog.records if "does not restore" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("checkpoint step 3 does not restore (")
    assert warnings[0].endswith(f"): moved to {aside}; resuming from step 2") and "OUT_OF_RANGE" in warnings[0]
    assert (aside / truncated.relative_to(tmp_path / "checkpoints" / "3")).stat().st_size == 100  # kept as it was
    state_lib.save_checkpoint(ckpts, state, 3, jax.random.key(0))  # the step can be saved again
    assert ckpts.all_steps() == [1, 2, 3]
    ckpts.close()


def test_when_no_checkpoint_restores_the_run_stops_in_one_line_and_moves_nothing(tmp_path):
    ckpts, target = small_run(tmp_path, steps=(1, 2))
    for step in (1, 2):
        truncate_a_data_file(tmp_path / "checkpoints" / str(step))
    before = snapshot(tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match=r"no checkpoint in .* restores; the newest, step 2, fails"):
        state_lib.restore_newest(ckpts, target)
    ckpts.close()
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_a_run_on_a_corrupt_newest_checkpoint_resumes_from_the_previous_one(tmp_path, caplog):
    loop.train_and_evaluate(vae_config(steps=6), tmp_path / "uninterrupted", batches_fn=synthetic_batches)
    workdir = tmp_path / "w"
    shutil.copytree(tmp_path / "uninterrupted", workdir)
    truncate_a_data_file(workdir / "checkpoints" / "6")
    with caplog.at_level(logging.WARNING):
        final = loop.train_and_evaluate(vae_config(steps=7), workdir, batches_fn=synthetic_batches)
    assert "checkpoint step 6 does not restore" in caplog.text and int(final.step) == 7
    assert sorted(complete_checkpoints(workdir)) == [4, 6, 7]
    resumed, uninterrupted = (checkpoint.load_trained_params(w, step=6) for w in (workdir, tmp_path / "uninterrupted"))
    assert max_abs_diff(resumed, uninterrupted) == 0  # step 6 again, from step 4: the same params


# ------------------------------------------------------------------------------------------- disk full

NO_SPACE_AT_STEP_4 = """
import errno, os, runpy, sys
from sdjax import checkpoint

save = checkpoint.Checkpoints.save
def save_until_full(self, step, items, meta):
    if step == 4:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.directory / "4"))
    save(self, step, items, meta)
checkpoint.Checkpoints.save = save_until_full
sys.argv = sys.argv[1:]
runpy.run_path("train.py", run_name="__main__")
"""


def test_a_full_disk_is_one_error_naming_the_path_and_the_step_to_resume_from(tmp_path):
    (tmp_path / "checkpoints" / "2").mkdir(parents=True)  # an earlier complete checkpoint
    with pytest.raises(workdir_lib.DiskFullError) as error, workdir_lib.owned(tmp_path):
        raise ValueError("Save Finalize thread failed") from OSError(
            errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "checkpoints" / "4")
        )
    assert str(error.value) == (
        f"no space left on the device of {tmp_path / 'checkpoints' / '4'} (the run stopped; earlier checkpoints are "
        f"intact): free space there (df -h {tmp_path}), or lower --config.keep_checkpoints, then rerun the same "
        "command: it resumes from step 2, the last complete checkpoint"
    )
    assert (
        sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", workdir_lib.LOCK_FILE]
        and (tmp_path / "checkpoints" / "2").is_dir()
    )


@pytest.mark.slow
def test_disk_full_stops_the_run_in_one_line_and_keeps_the_earlier_checkpoints(tmp_path, data_dir, compilation_cache):
    workdir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(NO_SPACE_AT_STEP_4), *TINY, f"--workdir={workdir}",
         f"--config.data.data_dir={data_dir}", "--config.steps=6", "--config.checkpoint_every=2"],
        cwd=REPO, env=cache_env(compilation_cache), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1] == (
        f"train.py: DiskFullError: no space left on the device of {workdir / 'checkpoints' / '4'} (the run stopped; "
        f"earlier checkpoints are intact): free space there (df -h {workdir}), or lower --config.keep_checkpoints, "
        "then rerun the same command: it resumes from step 2, the last complete checkpoint"
    )
    assert complete_checkpoints(workdir) == [2]
    assert set(checkpoint.load_trained_params(workdir)) == {"vae"}


def test_disk_full_is_found_behind_the_errors_that_wrap_it():
    full = OSError(errno.ENOSPC, "No space left on device", "/w/checkpoints/4")
    try:
        try:
            raise full
        except OSError as e:
            raise ValueError("Save Finalize thread failed") from e
    except ValueError as wrapped:
        assert workdir_lib._no_space(wrapped) is full
    tensorstore = ValueError('RESOURCE_EXHAUSTED: Error writing "x": No space left on device [os_error_code=28]')
    assert workdir_lib._no_space(tensorstore) is tensorstore
    assert workdir_lib._no_space(OSError(errno.EACCES, "Permission denied")) is None
