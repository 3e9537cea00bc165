r"""Trains an sdjax model: stage 1 (VAE) or stage 2 (latent diffusion), from scratch or fine-tuning.

    python train.py --config=configs/shapes64_vae.py --workdir=workdirs/shapes64_vae
    python train.py --config=configs/shapes64.py --workdir=workdirs/shapes64 [--config.steps=2000 ...]
    python train.py --config=configs/shapes64.py:tiny --workdir=/tmp/tiny    # smoke-test variant of a config

Every config field can be overridden with --config.<field>=<value> (ml_collections config_flags).
--nocompile_cache (or SDJAX_NO_COMPILE_CACHE=1) skips JAX's persistent compilation cache.

Resuming: rerun the same command on the same --workdir. The run restores its latest checkpoint
(workdir/checkpoints/<step>) and continues with the same data order and randomness, also after a SIGKILL.
SIGTERM (preemption) saves a checkpoint at the current step and exits cleanly (status 0).
A NaN/inf loss stops the run (status 1) without saving the diverged state.

Devices: the update step is one jax.jit program over a mesh of every device of every host (1 CPU, N GPUs, a TPU
slice), docs/sharding.md. The global batch (config.batch_size) is split evenly over all devices; the params,
AdamW moments and EMA are replicated (data parallelism, the default) or split over --config.mesh.fsdp=N devices
(fully sharded data parallelism: N times less state per device). XLA_FLAGS=--xla_force_host_platform_device_count=N
simulates N devices on a CPU.

Multi-host (TPU pod slices, several GPU hosts): start the same command on every host with
--config.distributed=True. It calls jax.distributed.initialize(), which finds the cluster by itself on Cloud TPU
(and SLURM); elsewhere set JAX_COORDINATOR_ADDRESS=host:port (process 0's host), JAX_NUM_PROCESSES and
JAX_PROCESS_ID on every process. CPU collectives use gloo. Every host reads its own slice of each global batch;
host 0 writes workdir/model, logs and samples; every host writes its devices' shards of each checkpoint (host 0
alone when the state is replicated), so --workdir must be a shared filesystem or a gs:// bucket path mounted the
same on every host. A process whose peer dies stops with one line within about --distributed_heartbeat_timeout
seconds; rerun every process to resume from the last checkpoint.

Outputs in --workdir: model/ (diffusers-style configs, tokenizer, scheduler, frozen weights), checkpoints/,
logs/ (TensorBoard), samples/<step>.png, train_config.json, train.lock (one run per workdir: a second is refused),
unreadable_checkpoints/ (checkpoints that did not restore, moved aside). Load the result with
sdjax.StableDiffusion.from_pretrained(workdir); the last line printed gives the sample.py command.
"""

from __future__ import annotations

import logging as pylogging
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import NoReturn

# Quiet third-party start-up chatter: TensorFlow's C++ INFO lines, transformers' "PyTorch was not found".
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import jax
from absl import app, flags, logging
from ml_collections import config_flags

# Training's input pipeline is an extra (sampling needs none of it): say so in one line, before any work.
TRAIN_EXTRAS = ("tensorflow", "tensorflow_datasets")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py[:arg]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the model folder, checkpoints, logs and samples.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Log at INFO level (Orbax, JAX, sdjax); default: warnings only.")
_COMPILE_CACHE = flags.DEFINE_bool(
    "compile_cache", True, "JAX's persistent compilation cache ($SDJAX_CACHE_DIR, else ~/.cache/sdjax/jax)."
)
flags.mark_flags_as_required(["config", "workdir"])


_INIT_TIMEOUT = flags.DEFINE_integer(
    "distributed_init_timeout", 300, "--config.distributed: seconds to wait for the coordinator and every process."
)
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "distributed_heartbeat_timeout", 60, "--config.distributed: seconds after which a silent process counts as dead."
)
ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
EXIT_USAGE = 2  # bad command line or environment, as absl's flag errors


def _usage_exit(message: str) -> NoReturn:
    """Prints ``train.py: message`` and exits with status 2 (the SystemExit's text is the message, for callers)."""
    print(f"train.py: {message}", file=sys.stderr, flush=True)
    error = SystemExit(message)
    error.code = EXIT_USAGE
    raise error


def _cluster_from_env() -> dict[str, object]:
    """jax.distributed.initialize arguments from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.

    JAX itself reads only the first of them (it wants the others as arguments or from a cluster it detects:
    Cloud TPU, SLURM...), so a cluster described by the three variables would not start without this. Without
    JAX_NUM_PROCESSES the cluster is left to JAX's detection ({})."""
    env = os.environ
    if "JAX_NUM_PROCESSES" not in env:
        return {}  # auto-detection (Cloud TPU, SLURM, ...)
    try:
        num_processes, process_id = int(env["JAX_NUM_PROCESSES"]), int(env.get("JAX_PROCESS_ID", ""))
    except ValueError:
        _usage_exit(
            "JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers, got JAX_NUM_PROCESSES="
            f"{env['JAX_NUM_PROCESSES']!r}, JAX_PROCESS_ID={env.get('JAX_PROCESS_ID', '(unset)')!r} (set all three "
            f"of {', '.join(ENV_VARS)} on every process)"
        )
    if not 0 <= process_id < num_processes:
        _usage_exit(f"JAX_PROCESS_ID={process_id} must be in [0, JAX_NUM_PROCESSES={num_processes})")
    address = env.get("JAX_COORDINATOR_ADDRESS", "")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        _usage_exit(f"JAX_COORDINATOR_ADDRESS={address!r} must be host:port of process 0 (e.g. 10.0.0.1:1234)")
    return {"coordinator_address": address, "num_processes": num_processes, "process_id": process_id}


def _check_coordinator(address: str, process_id: int, timeout: float) -> None:
    """One line (exit 2) instead of JAX's abort when the coordinator cannot work: process 0 cannot bind its port,
    or another process cannot reach it within ``timeout`` seconds (it may start later than this one)."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if process_id == 0:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            try:  # JAX's coordinator binds the port on every interface
                s.bind(("::" if ":" in host else "", int(port)))
            except OSError as e:
                _usage_exit(f"process 0 cannot serve JAX_COORDINATOR_ADDRESS={address}: port {port}: {e.strerror}")
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
            return
        except OSError as e:
            if time.monotonic() > deadline:
                _usage_exit(
                    f"no coordinator at JAX_COORDINATOR_ADDRESS={address} after {timeout:.0f} s ({e.strerror or e}); "
                    "start process 0 there, or fix the address (--distributed_init_timeout sets the wait)"
                )
            time.sleep(1)  # polling a TCP port: there is nothing to wait on


def start_cluster() -> None:
    """jax.distributed.initialize from the environment, with gloo CPU collectives and bounded timeouts."""
    cluster = _cluster_from_env()
    # Cross-process collectives of the CPU backend need an implementation; without one they fail.
    if jax.config.jax_cpu_collectives_implementation in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if cluster:
        _check_coordinator(cluster["coordinator_address"], cluster["process_id"], _INIT_TIMEOUT.value)
    try:
        jax.distributed.initialize(
            **cluster,
            initialization_timeout=_INIT_TIMEOUT.value,
            heartbeat_timeout_seconds=_HEARTBEAT_TIMEOUT.value,
            # A failed process exits at once (os._exit below); a finished one waits this long for the others.
            shutdown_timeout_seconds=_HEARTBEAT_TIMEOUT.value,
        )
    except (ValueError, TypeError, RuntimeError) as e:  # JAX's "Number of processes must be defined." and co.
        _usage_exit(
            f"--config.distributed=True found no cluster ({str(e).splitlines()[0]}): run on Cloud TPU or SLURM, or "
            f"set {', '.join(ENV_VARS)} on every process"
        )


def _lost_peer(error: BaseException) -> bool:
    # A collective whose peer process died: gloo's TCP pair closes (XLA raises it as ValueError/RuntimeError);
    # or a barrier the peer never reaches times out (Orbax's async_write_complete barrier after a save).
    text = str(error).lower()
    if "barrier" in text and ("timed out" in text or "deadline" in text):
        return True
    return any(s in text for s in ("gloo", "connection closed by peer", "coordination service", "heartbeat"))


class _OneLineBackgroundErrors(pylogging.Filter):
    """When a peer dies during a save, Orbax's background commit thread logs its barrier error with a traceback
    just before train.py reports the lost peer in one line: keep that record's message and the exception's first
    line, drop the traceback."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None and "orbax" in record.pathname:
            error = record.exc_info[1]
            record.msg = f"{record.getMessage()} ({type(error).__name__}: {str(error).splitlines()[0]})"
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


class _DropDiskFullErrors(pylogging.Filter):
    """A full disk fails every pending write of a checkpoint at once; Orbax's and asyncio's background threads log
    each failure with a traceback. The run's own DiskFullError line says it once, with what to do."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info and record.exc_info[1] else "")
        return "No space left on device" not in text and "Disk quota exceeded" not in text


def _quiet_closed_loop_callbacks(unraisable: object) -> None:
    """After a failed save Orbax closes its event loop while TensorStore still completes the save's other writes;
    their callbacks then find the loop closed (an unraisable RuntimeError each, printed with a traceback). Those
    are dropped; any other unraisable error is printed as before."""
    error = getattr(unraisable, "exc_value", None)
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        return
    sys.__unraisablehook__(unraisable)


def _exit_now(status: int) -> NoReturn:
    """Exits without JAX's shutdown barrier: peers blocked in a collective with this process would keep it
    waiting (and then abort it); exiting closes the connections, so they fail at once too."""
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; pass settings as --config.<field>=<value>")
    config = _CONFIG.value
    # Quiet by default: Orbax logs every save step by step and JAX its backend search at INFO.
    logging.set_verbosity(logging.INFO if _VERBOSE.value else logging.WARNING)

    if _COMPILE_CACHE.value:  # a rerun (resume) reads the update step and the preview sampler from disk
        from sdjax.compile_cache import enable_compile_cache

        enable_compile_cache()

    # --- Cluster: must run before anything touches a JAX device.
    distributed = bool(config.get("distributed"))
    if distributed:
        start_cluster()
        logging.get_absl_handler().addFilter(_OneLineBackgroundErrors())
    logging.get_absl_handler().addFilter(_DropDiskFullErrors())
    sys.unraisablehook = _quiet_closed_loop_callbacks
    logging.info("process %d/%d, %d local devices: %s", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.local_devices())  # fmt: skip

    from sdjax.train import loop
    from sdjax.train.monitor import NonFiniteLossError
    from sdjax.train.workdir import DiskFullError, closing_line

    # --- Train: sdjax's own errors (bad config, data, weights; divergence) end the run with one clear line;
    # anything else is a bug and keeps its traceback.
    try:
        loop.train_and_evaluate(config, _WORKDIR.value, host_state=False)
        if jax.process_index() == 0:
            print(closing_line(config, Path(_WORKDIR.value).absolute()), file=sys.stderr, flush=True)
    except Exception as e:
        ours = isinstance(e, (NonFiniteLossError, ValueError, DiskFullError)) and type(e).__module__.startswith("sdjax")
        if not (ours or distributed):
            raise
        if ours:
            print(f"train.py: {type(e).__name__}: {e}", file=sys.stderr)
        elif _lost_peer(e):
            print(
                f"train.py: process {jax.process_index()} of {jax.process_count()} lost another process of the run "
                f"({str(e).splitlines()[0]}); rerun the command on every host to resume from the last checkpoint",
                file=sys.stderr,
            )
        else:
            traceback.print_exc()
        if distributed:
            _exit_now(1)
        sys.exit(1)


def _config_override_error(argv: list[str], error: Exception) -> str:
    """One line for a --config.<field> override that does not apply, with close matches among the fields."""
    import difflib

    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    fields: list[str] = []
    if spec:
        try:
            fields = [k for k, _ in _flatten(_load_config(spec).to_dict())]
        except Exception:  # noqa: BLE001 - the config file itself is broken: report the original error
            return f"train.py: cannot read config {spec}: {error}"
    for arg in argv:
        if arg.startswith("--config.") and "=" in arg:
            name = arg[len("--config.") :].split("=", 1)[0]
            if fields and name not in fields:
                close = difflib.get_close_matches(name, fields, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                return f"train.py: unknown config field {name!r} (from {arg}){hint}"
    return f"train.py: bad --config value: {type(error).__name__}: {error}"


def _load_config(spec: str):
    """The ConfigDict of ``configs/x.py[:arg]``, without flag overrides."""
    import importlib.util

    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_train_config", path)
    if module_spec is None:
        raise FileNotFoundError(f"no Python file {path}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def _flatten(tree: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out += _flatten(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "--helpfull", "-?")


def print_help(argv: list[str]) -> None:
    """The module docstring, train.py's flags (--helpfull: every module's), and the config's fields."""
    print(__doc__.strip() + "\n")
    full = "--helpfull" in argv
    print(flags.FLAGS.get_help() if full else flags.FLAGS.main_module_help())
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None:
        print("\nConfig fields: add --config=FILE (e.g. --config=configs/shapes64.py --help) to list every")
        print("--config.<field> of that file with its value; each configs/*.py documents its fields.")
        return
    try:
        config = _load_config(spec)
    except Exception as e:  # noqa: BLE001 - help still helps when the config file is broken
        print(f"\nConfig fields: cannot read {spec}: {type(e).__name__}: {e}")
        return
    print(f"\nConfig fields of {spec} (override with --config.<field>=<value>):")
    for name, value in _flatten(config.to_dict()):
        print(f"  --config.{name}={value!r}")


def _missing_extras() -> list[str]:
    import importlib.util

    return [name for name in TRAIN_EXTRAS if importlib.util.find_spec(name) is None]


if __name__ == "__main__":
    if any(a in HELP_FLAGS for a in sys.argv[1:]):
        print_help(sys.argv[1:])
        sys.exit(0)
    if missing := _missing_extras():
        sys.exit(f"train.py: training needs {', '.join(missing)} (not installed): pip install -e '.[train]'")
    try:  # parse up front: a bad --config.<field> is one line, not absl's traceback
        remaining = flags.FLAGS(sys.argv)
        _CONFIG.value.keys()  # loading the config applies the overrides; a load error surfaces on first use
    except flags.Error as e:  # ml_collections puts the config file's traceback in the message: keep its last line
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        sys.exit(f"train.py: {lines[0]} {lines[-1]}" if len(lines) > 1 else f"train.py: {e}")
    except OSError as e:  # ml_collections reports a config file it cannot read as an OSError
        reason = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
        sys.exit(f"train.py: cannot load the --config file: {reason}")
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        sys.exit(_config_override_error(sys.argv, e))
    app.run(main, flags_parser=lambda argv: remaining)
