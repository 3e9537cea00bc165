"""Multi-host training, for real: train.py as two processes on this machine (one CPU device each, gloo collectives,
a coordinator on 127.0.0.1), started as the README says (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID and --config.distributed=True), against one process with two devices: data-parallel, fsdp=2 across
the two processes, and stage 2 on a stage-1 workdir.

Several train.py runs (TensorFlow start-up, a first compile, 2-process barriers) take a few minutes on a 2-core
machine: those tests are marked slow (``pytest -m slow tests/test_multihost.py``). A 2-process smoke run of two
fsdp steps and the bad-environment tests run by default. Every process is started with a deadline and killed in a
``finally``.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from sdjax import checkpoint

REPO = Path(__file__).resolve().parents[1]
STEPS = 6  # optimizer steps of the uninterrupted runs; a checkpoint every 2
RUN_TIMEOUT = 600  # s, one train.py run on a loaded 2-core machine (compiling included)
PEER_DEATH_BOUND = 60  # s, from SIGKILL of one process to the other's exit (heartbeat timeout 20 s below)
HEARTBEAT = 20
TRAIN = [
    sys.executable, "train.py", "--config=configs/shapes64_vae.py:tiny", "--verbose", "--alsologtostderr",
    f"--distributed_heartbeat_timeout={HEARTBEAT}", "--distributed_init_timeout=120",
    # A constant learning rate makes a run of N steps a prefix of any longer run (resume after a kill).
    "--config.optim.schedule=constant", "--config.eval_every=0", "--config.checkpoint_every=2",
    "--config.log_every=1", "--config.keep_checkpoints=10",
    # Adam's g / (|g| + eps) amplifies rounding of the mean gradient where |g| ~ eps (as tests/test_train.py).
    "--config.optim.eps=1e-3",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict[str, Path]:
    """A compilation cache and a prepared data folder shared by every run of this module."""
    return {"cache": tmp_path_factory.mktemp("jax_cache"), "data": tmp_path_factory.mktemp("tfds")}


def environment(shared: dict[str, Path], devices: int, batch_log: Path | None = None, **cluster: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SDJAX_")) and k != "XLA_FLAGS"}
    flags = f"--xla_force_host_platform_device_count={devices} {shared.get('xla_flags', '')}".strip()
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=flags, SDJAX_CACHE_DIR=str(shared["cache"]), TF_CPP_MIN_LOG_LEVEL="2",
               **cluster)  # fmt: skip
    if batch_log is not None:
        env["SDJAX_BATCH_LOG"] = str(batch_log)
    return env


FSDP = ["--config.mesh.fsdp=2", "--config.mesh.min_shard_size=256"]  # the tiny VAE's arrays are small
STAGE2 = ["--config=configs/shapes64.py:tiny"]


def train_args(shared: dict[str, Path], workdir: Path, steps: int, *extra: str) -> list[str]:
    """train.py's command line; a ``--config=`` in ``extra`` replaces TRAIN's."""
    config = [e for e in extra if e.startswith("--config=")]
    base = [config[0] if config and a.startswith("--config=") else a for a in TRAIN]
    extra = tuple(e for e in extra if not e.startswith("--config="))
    return [*base, f"--workdir={workdir}", f"--config.data.data_dir={shared['data']}", f"--config.steps={steps}",
            *extra]  # fmt: skip


class Cluster:
    """Two train.py processes of one run; stderr of process i in ``logs/i.txt``."""

    def __init__(self, shared: dict[str, Path], workdir: Path, steps: int, logs: Path, batch_log: Path | None = None,
                 extra: tuple[str, ...] = ()):  # fmt: skip
        port, self.logs = free_port(), logs
        logs.mkdir(parents=True, exist_ok=True)
        self.processes = []
        for i in range(2):
            env = environment(shared, 1, batch_log, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                              JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))  # fmt: skip
            args = train_args(shared, workdir, steps, "--config.distributed=True", *extra)
            with open(logs / f"{i}.txt", "w") as err:
                self.processes.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err))

    def wait(self, timeout: float = RUN_TIMEOUT) -> list[int]:
        deadline = time.monotonic() + timeout
        return [p.wait(timeout=max(deadline - time.monotonic(), 1)) for p in self.processes]

    def stderr(self, i: int) -> str:
        return (self.logs / f"{i}.txt").read_text()

    def kill(self) -> None:
        for p in self.processes:
            if p.poll() is None:
                p.kill()
            p.wait()


def run_one_process(shared: dict[str, Path], workdir: Path, steps: int, batch_log: Path | None = None,
                    extra: tuple[str, ...] = ()) -> None:  # fmt: skip
    """The reference: one process with two devices, the same global batch."""
    out = subprocess.run(train_args(shared, workdir, steps, *extra), cwd=REPO, env=environment(shared, 2, batch_log),
                         capture_output=True, text=True, timeout=RUN_TIMEOUT)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]


def run_two_processes(shared: dict[str, Path], workdir: Path, steps: int, logs: Path, batch_log=None,
                      extra: tuple[str, ...] = ()) -> Cluster:  # fmt: skip
    cluster = Cluster(shared, workdir, steps, logs, batch_log, extra)
    try:
        codes = cluster.wait()
    finally:
        cluster.kill()
    assert codes == [0, 0], cluster.stderr(0)[-2000:] + cluster.stderr(1)[-2000:]
    return cluster


def complete_checkpoints(workdir: Path) -> list[int]:
    # Orbax renames a checkpoint to its bare step number only once every process has finished it.
    folder = workdir / "checkpoints"
    return sorted(int(p.name) for p in folder.glob("*") if p.name.isdigit()) if folder.is_dir() else []


def max_abs_diff(a, b) -> float:
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in pairs)


def read_batch_log(folder: Path, process: int) -> dict[int, list[str]]:
    """Data position -> example digests this process read (read-ahead included)."""
    lines = (folder / f"batches.{process}.jsonl").read_text().splitlines()
    return {r["position"]: r["examples"] for r in map(json.loads, lines)}


@pytest.fixture(scope="module")
def one_process_run(shared, tmp_path_factory) -> tuple[Path, Path]:
    """(workdir, batch log folder) of a 1-process 2-device run of STEPS steps (it also prepares the data)."""
    root = tmp_path_factory.mktemp("one_process")
    run_one_process(shared, root / "run", STEPS, root / "batches")
    return root / "run", root / "batches"


@pytest.fixture(scope="module")
def two_process_run(shared, one_process_run, tmp_path_factory) -> tuple[Path, Path]:
    """(workdir, batch log folder) of the same run as two processes with one device each."""
    root = tmp_path_factory.mktemp("two_processes")
    run_two_processes(shared, root / "run", STEPS, root / "logs", root / "batches")
    return root / "run", root / "batches"


@pytest.mark.slow
def test_each_process_reads_its_own_slice_of_every_global_batch(one_process_run, two_process_run):
    whole = read_batch_log(one_process_run[1], 0)
    first, second = (read_batch_log(two_process_run[1], i) for i in range(2))
    for position in range(STEPS):
        assert not set(first[position]) & set(second[position]), position
        # Process 0 holds the first half of the global batch, process 1 the second (devices in process order).
        assert first[position] + second[position] == whole[position], position
        assert len(first[position]) == len(whole[position]) // 2


@pytest.mark.slow
def test_two_processes_train_the_params_of_one_process_with_two_devices(one_process_run, two_process_run):
    for ema in (False, True):
        one = checkpoint.load_trained_params(one_process_run[0], STEPS, ema=ema)
        two = checkpoint.load_trained_params(two_process_run[0], STEPS, ema=ema)
        assert max_abs_diff(one, two) <= 1e-6, f"ema={ema}"


@pytest.mark.slow
def test_checkpoints_are_written_once_by_process_0(two_process_run):
    workdir = two_process_run[0]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4", "6"]  # no tmp/duplicate step
    for step in (2, 4, 6):
        for item in ("params", "ema_params", "opt_state"):
            writers = sorted(p.name for p in (workdir / "checkpoints" / str(step) / item).glob("ocdbt.process_*"))
            assert writers == ["ocdbt.process_0"], (step, item, writers)
        assert json.loads((workdir / "checkpoints" / str(step) / "meta" / "metadata").read_text())["step"] == step


def shard_writers(workdir: Path, step: int, item: str) -> list[str]:
    return sorted(p.name for p in (workdir / "checkpoints" / str(step) / item).glob("ocdbt.process_*"))


@pytest.fixture(scope="module")
def fsdp_two_process_run(shared, one_process_run, tmp_path_factory) -> Path:
    """The workdir of the run of ``one_process_run`` as two processes with the state split over both (fsdp=2)."""
    root = tmp_path_factory.mktemp("fsdp_two_processes")
    run_two_processes(shared, root / "run", STEPS, root / "logs", extra=tuple(FSDP))
    return root / "run"


@pytest.mark.slow
def test_fsdp_across_two_processes_trains_the_params_of_one_process_with_two_devices(one_process_run,
                                                                                     fsdp_two_process_run):  # fmt: skip
    for ema in (False, True):
        one = checkpoint.load_trained_params(one_process_run[0], STEPS, ema=ema)
        two = checkpoint.load_trained_params(fsdp_two_process_run, STEPS, ema=ema)
        print(f"fsdp=2 on 2 processes vs 1 process (ema={ema}): max |difference| = {max_abs_diff(one, two):.2e}")
        assert max_abs_diff(one, two) <= 1e-6, f"ema={ema}"


@pytest.mark.slow
def test_each_process_writes_its_own_shards_of_an_fsdp_state(fsdp_two_process_run):
    for item in ("params", "ema_params", "opt_state"):
        assert shard_writers(fsdp_two_process_run, STEPS, item) == ["ocdbt.process_0", "ocdbt.process_1"], item


@pytest.fixture(scope="module")
def stage2_runs(shared, two_process_run, tmp_path_factory) -> tuple[Path, Path]:
    """Stage 2 (configs/shapes64.py:tiny, fsdp=2) on the 2-process stage-1 workdir: (1 process with 2 devices,
    2 processes) workdirs. Host 0 alone writes the model folder, which opens the stage-1 workdir's checkpoints."""
    root = tmp_path_factory.mktemp("stage2")
    extra = (*STAGE2, f"--config.vae_path={two_process_run[0]}", *FSDP)
    run_one_process(shared, root / "one", 2, extra=extra)
    run_two_processes(shared, root / "two", 2, root / "logs", extra=extra)
    return root / "one", root / "two"


@pytest.mark.slow
def test_stage2_on_a_stage1_workdir_trains_on_two_processes_as_on_one(stage2_runs):
    one, two = stage2_runs
    scaling = [json.loads((w / "model" / "vae" / "config.json").read_text())["scaling_factor"] for w in stage2_runs]
    assert scaling[0] == scaling[1]  # measured on the whole first batches, whatever the host count
    for ema in (False, True):
        difference = max_abs_diff(*(checkpoint.load_trained_params(w, 2, ema=ema) for w in (one, two)))
        print(f"stage 2, 2 processes vs 1 process (ema={ema}): max |difference| = {difference:.2e}")
        assert difference <= 1e-6


def write_pictures(folder: Path, n: int = 8) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"picture {i}")


def test_two_processes_train_two_fsdp_steps(tmp_path):
    """Smoke test of the default suite (a folder of 8 pictures: nothing to render first): the 2-process cluster
    starts, splits the state over both processes, trains two steps, and each process saves its shards."""
    write_pictures(tmp_path / "pictures")
    # Unoptimised XLA:CPU code compiles in 60% of the time (~30 instead of ~48 CPU s per process); the numbers
    # are not compared here.
    shared = {"cache": tmp_path / "cache", "data": tmp_path / "tfds", "xla_flags": "--xla_backend_optimization_level=0"}
    started, cpu = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
    extra = (*FSDP, f"--config.data.source={tmp_path / 'pictures'}")
    cluster = run_two_processes(shared, tmp_path / "run", 2, tmp_path / "logs", extra=extra)
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime
    print(f"2-process smoke run: {time.monotonic() - started:.0f} s, {cpu_s:.0f} CPU s, load {os.getloadavg()[0]:.1f}")
    assert complete_checkpoints(tmp_path / "run") == [2]
    assert shard_writers(tmp_path / "run", 2, "params") == ["ocdbt.process_0", "ocdbt.process_1"]
    for i in range(2):
        assert "Traceback" not in cluster.stderr(i)


@pytest.fixture(scope="module")
def killed_run(shared, one_process_run, tmp_path_factory) -> dict:
    """A 2-process run whose process 1 is SIGKILLed after its first checkpoint, then both restarted to finish
    two steps after that checkpoint: the survivor's exit (code, seconds after the kill, stderr) and the rerun."""
    root = tmp_path_factory.mktemp("killed")
    workdir = root / "run"
    cluster = Cluster(shared, workdir, 100_000, root / "logs")
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not complete_checkpoints(workdir):
            assert all(p.poll() is None for p in cluster.processes), "a process exited before the first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within the deadline"
            time.sleep(0.2)  # polling a folder for a file: nothing to wait on
        cluster.processes[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        try:
            code = cluster.processes[0].wait(timeout=PEER_DEATH_BOUND)
        except subprocess.TimeoutExpired:
            code = None
        seconds = time.monotonic() - killed
    finally:
        cluster.kill()
    killed_at = max(complete_checkpoints(workdir))
    rerun = run_two_processes(shared, workdir, killed_at + 2, root / "rerun_logs")
    return {"code": code, "seconds": seconds, "stderr": cluster.stderr(0), "killed_at": killed_at,
            "workdir": workdir, "rerun": rerun, "root": root}  # fmt: skip


@pytest.mark.slow
def test_a_process_whose_peer_dies_stops_with_one_line_in_bounded_time(killed_run):
    assert killed_run["code"] == 1, f"exit code {killed_run['code']} after {killed_run['seconds']:.0f} s"
    assert killed_run["seconds"] < PEER_DEATH_BOUND
    last = killed_run["stderr"].strip().splitlines()[-1]
    assert last.startswith("train.py: process 0 of 2 lost another process of the run"), last
    assert "Traceback" not in killed_run["stderr"]


@pytest.mark.slow
def test_both_processes_resume_from_the_last_checkpoint_after_one_is_killed(shared, killed_run):
    workdir, step = killed_run["workdir"], killed_run["killed_at"]
    for i in range(2):
        assert f"resumed from {workdir / 'checkpoints' / str(step)} at step {step}" in killed_run["rerun"].stderr(i)
    assert complete_checkpoints(workdir)[-1] == step + 2
    uninterrupted = killed_run["root"] / "uninterrupted"
    run_one_process(shared, uninterrupted, step + 2)
    for ema in (False, True):
        resumed = checkpoint.load_trained_params(workdir, step + 2, ema=ema)
        expected = checkpoint.load_trained_params(uninterrupted, step + 2, ema=ema)
        assert max_abs_diff(resumed, expected) <= 1e-6, f"ema={ema}"


# ----------------------------------------------------------------------------------------------- bad environment


def start_with(tmp_path: Path, timeout: float = 120, **cluster: str) -> subprocess.CompletedProcess:
    env = environment({"cache": tmp_path / "cache", "data": tmp_path / "tfds"}, 1, **cluster)
    args = [*train_args({"data": tmp_path / "tfds"}, tmp_path / "run", 1), "--config.distributed=True",
            "--distributed_init_timeout=3"]  # fmt: skip
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def assert_one_line_exit_2(out: subprocess.CompletedProcess, expected: str) -> None:
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: ") and expected in last, last


def test_a_process_id_that_is_not_an_integer_is_one_line(tmp_path):
    out = start_with(tmp_path, JAX_COORDINATOR_ADDRESS="127.0.0.1:1", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="one")
    assert_one_line_exit_2(out, "JAX_PROCESS_ID='one'")


def test_a_missing_process_id_is_one_line(tmp_path):
    out = start_with(tmp_path, JAX_COORDINATOR_ADDRESS="127.0.0.1:1", JAX_NUM_PROCESSES="2")
    assert_one_line_exit_2(out, "JAX_PROCESS_ID='(unset)'")


def test_an_unreachable_coordinator_is_one_line_after_the_init_timeout(tmp_path):
    started = time.monotonic()
    out = start_with(tmp_path, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}", JAX_NUM_PROCESSES="2",
                     JAX_PROCESS_ID="1")  # fmt: skip
    assert_one_line_exit_2(out, "no coordinator at JAX_COORDINATOR_ADDRESS=127.0.0.1:")
    assert time.monotonic() - started < 60


def test_no_cluster_to_detect_is_one_line(tmp_path):
    out = start_with(tmp_path, JAX_COORDINATOR_ADDRESS="127.0.0.1:1")  # no count, no id, no TPU or SLURM
    assert_one_line_exit_2(out, "found no cluster")
    assert not (tmp_path / "run").exists()
