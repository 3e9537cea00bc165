"""The workdir a run owns: one run at a time (an advisory lock), the clean-up of a run that failed to start, a
full disk, and the line that says what the workdir holds when the run ends.

A run takes ``DIR/train.lock`` (``fcntl.flock``, exclusive) before it writes anything in ``DIR``, writes its pid
and host into it, and holds it until it ends. A second run on the same workdir is refused in one line naming the
holder. The kernel drops a flock when its process dies, so a lock left by a killed run (SIGKILL, a crash, a
reboot) is simply taken over; its stale pid is overwritten. Multi-host runs: process 0 alone takes the lock (the
workdir is one run's, whatever its process count; the other processes write only their checkpoint shards, after
process 0 has started).

A run that fails before it saved a checkpoint (a failed start) removes what it created in the workdir, and the
workdir itself when it created it; it never touches what was there before, and a refused run touches nothing.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shlex
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_collections
from absl import logging

from sdjax import checkpoint
from sdjax.train.checks import TrainConfigError

LOCK_FILE = "train.lock"
# Filesystems without POSIX locks (some FUSE mounts of buckets) answer flock with one of these: the run goes on
# unlocked, with a warning, rather than not at all.
NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)


class WorkdirBusyError(TrainConfigError):
    """Another run holds the workdir's lock."""


class DiskFullError(RuntimeError):
    """A write of the run found no space left on its device; the run stopped, earlier checkpoints intact."""


class Workdir:
    """A run's hold on its workdir (a context manager): the lock, what existed before, whether it was created."""

    def __init__(self, path: Path, owner: bool = True):
        self.path, self.owner, self.created, self.before, self._fd = path, owner, False, set(), None

    def __enter__(self) -> Workdir:
        if self.path.exists() and not self.path.is_dir():
            raise TrainConfigError(f"workdir {self.path} is a file; pass a folder (new or a run's workdir)")
        if not self.owner:  # another process of this run creates and locks it
            return self
        for _ in range(10):  # a lock on a workdir its holder removed (failed start) is retried on the new one
            self._make()
            if self._take_lock():
                return self
        raise TrainConfigError(f"workdir {self.path} keeps being removed by another run; start this one later")

    def _make(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.mkdir()
            self.created = True
        except FileExistsError:
            self.created = False
        except OSError as e:
            raise TrainConfigError(f"cannot create workdir {self.path}: {e.strerror}") from e
        self.before = {p.name for p in self.path.iterdir()} if not self.created else set()

    def _take_lock(self) -> bool:
        """True when this process holds the lock of the current workdir; False when that workdir was removed
        meanwhile; WorkdirBusyError when another run holds it."""
        lock = self.path / LOCK_FILE
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            return False
        except OSError as e:
            raise TrainConfigError(f"cannot open {lock}: {e.strerror}; check the workdir's permissions") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 200, 0).decode(errors="replace").split()
            os.close(fd)
            if e.errno in NO_LOCKS:
                logging.warning("cannot lock %s (%s): make sure no other run uses this workdir", lock, e.strerror)
                self._fd = -1  # owned, unlocked
                return True
            who = f"pid {holder[0]} on {holder[1]}" if len(holder) > 1 else "a process that is starting"
            raise WorkdirBusyError(
                f"workdir {self.path} is in use by another train.py ({who}); wait for it to end or stop it, "
                "or use another --workdir"
            ) from None
        if not _same_file(fd, lock):  # the previous holder removed the workdir before releasing it
            os.close(fd)
            return False
        stale = os.pread(fd, 200, 0).decode(errors="replace").strip()
        if stale:
            logging.warning("took over %s from a run that ended without releasing it (%s)", lock, stale)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return True

    def clean_failed_start(self) -> None:
        """Removes what this run created, when it saved no checkpoint: the workdir if it was new, else the entries
        that were not there before. Only the lock holder cleans up: a refused run never gets here."""
        if self._fd is None:  # not the owner, or refused
            return
        checkpoints = self.path / checkpoint.CHECKPOINTS_DIR
        if checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir()):
            return
        if self.created:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        for entry in self.path.iterdir():
            if entry.name not in self.before and entry.name != LOCK_FILE:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()

    def __exit__(self, *exc: object) -> None:
        if self._fd is None or self._fd < 0:
            self._fd = None
            return
        if not self.created and LOCK_FILE not in self.before and not (self.path / checkpoint.CHECKPOINTS_DIR).exists():
            os.unlink(self.path / LOCK_FILE)  # a failed start in an existing folder leaves no lock file either
        else:
            os.ftruncate(self._fd, 0)  # released: the next run finds no pid to report as stale
        os.close(self._fd)
        self._fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def owned(path: Path, owner: bool = True) -> Iterator[Workdir]:
    """Holds ``path`` for a run: created if needed and locked by the ``owner`` process (process 0); when the run
    raises before its first checkpoint, the owner leaves the workdir as it found it."""
    with Workdir(path, owner) as workdir:
        try:
            yield workdir
        except BaseException as e:
            workdir.clean_failed_start()
            if (full := _no_space(e)) is not None:
                raise DiskFullError(_disk_full_message(path, full)) from e
            raise


def _no_space(error: BaseException | None) -> OSError | Exception | None:
    """The error in ``error``'s chain (causes, contexts) that says the disk or quota is full, if any. Orbax and
    TensorStore re-raise an OSError of a background write as other exceptions that keep only its text."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return error
        if any(text in str(error) for text in ("No space left on device", "Disk quota exceeded")):
            return error
        error = error.__cause__ or error.__context__
    return None


def _disk_full_message(path: Path, error: BaseException) -> str:
    where = getattr(error, "filename", None) or path
    checkpoints = path / checkpoint.CHECKPOINTS_DIR
    steps = [int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()] if checkpoints.is_dir() else []
    resume = f"it resumes from step {max(steps)}, the last complete checkpoint" if steps else "it starts again"
    return (
        f"no space left on the device of {where} (the run stopped; earlier checkpoints are intact): free space "
        f"there (df -h {path}), or lower --config.keep_checkpoints, then rerun the same command: {resume}"
    )


def closing_line(config: ml_collections.ConfigDict, path: Path) -> str:
    """train.py's last line: the step the workdir holds and the command that uses it (sample.py for a model,
    stage 2 for a VAE), or how to continue a run that stopped early (preemption)."""
    checkpoints = path / checkpoint.CHECKPOINTS_DIR
    step = max((int(p.name) for p in checkpoints.glob("*") if p.name.isdigit()), default=0)
    if step < config.steps:
        return f"train.py: stopped at step {step} of {config.steps} in {path}; rerun the same command to continue"
    if config.stage == "vae":
        return (
            f"train.py: done, step {step}: the VAE is in {path}; stage 2 trains on it with "
            f"--config.vae_path={shlex.quote(str(path))}"
        )
    captions = _captions(config.data.source)
    command = ["python", "sample.py", "--model", str(path), "--prompt", captions[0] if captions else "a photo"]
    return f"train.py: done, step {step}: the model is {path}; sample it: {shlex.join([*command, '--out', 'out'])}"


def _captions(source: Any) -> list[str] | None:
    from sdjax.data import sources  # the run read its data: TensorFlow is imported already

    return sources.captions(source)
