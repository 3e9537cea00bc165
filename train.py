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

Devices: the update step is pmapped over all local devices (1 CPU, N GPUs, the 4-8 cores of a TPU host);
XLA_FLAGS=--xla_force_host_platform_device_count=N simulates N devices on a CPU. The global batch
(config.batch_size) is split evenly over all devices of all hosts.

Multi-host (TPU pod slices, several GPU hosts): start the same command on every host with
--config.distributed=True. It calls jax.distributed.initialize(), which finds the cluster by itself on Cloud TPU
and from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (or SLURM) elsewhere. Every host reads its
own slice of each global batch; host 0 writes workdir/model, logs and samples; all hosts take part in saving
checkpoints, so --workdir must be a shared filesystem or a gs:// bucket path mounted the same on every host.

Outputs in --workdir: model/ (diffusers-style configs, tokenizer, scheduler, frozen weights), checkpoints/,
logs/ (TensorBoard), samples/<step>.png, train_config.json. Load the result with
sdjax.StableDiffusion.from_pretrained(workdir).
"""

from __future__ import annotations

import os
import sys

# Quiet third-party start-up chatter: TensorFlow's C++ INFO lines, transformers' "PyTorch was not found".
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from sdjax.train import loop
from sdjax.train.monitor import NonFiniteLossError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py[:arg]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the model folder, checkpoints, logs and samples.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Log at INFO level (Orbax, JAX, sdjax); default: warnings only.")
_COMPILE_CACHE = flags.DEFINE_bool(
    "compile_cache", True, "JAX's persistent compilation cache ($SDJAX_CACHE_DIR, else ~/.cache/sdjax/jax)."
)
flags.mark_flags_as_required(["config", "workdir"])


def _cluster_from_env() -> dict[str, object]:
    """jax.distributed.initialize arguments from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.

    JAX itself reads only the first of them (it wants the others as arguments or from a cluster it detects:
    Cloud TPU, SLURM...), so a cluster described by the three variables would not start without this."""
    env = os.environ
    if "JAX_COORDINATOR_ADDRESS" not in env or "JAX_NUM_PROCESSES" not in env:
        return {}  # auto-detection (Cloud TPU, SLURM, ...)
    try:
        return {
            "coordinator_address": env["JAX_COORDINATOR_ADDRESS"],
            "num_processes": int(env["JAX_NUM_PROCESSES"]),
            "process_id": int(env.get("JAX_PROCESS_ID", "")),
        }
    except ValueError:
        sys.exit("train.py: JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers (set all three variables)")


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
    if config.get("distributed"):
        jax.distributed.initialize(**_cluster_from_env())
    logging.info("process %d/%d, %d local devices: %s", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.local_devices())  # fmt: skip

    # --- Train: sdjax's own errors (bad config, data, weights; divergence) end the run with one clear line;
    # anything else is a bug and keeps its traceback.
    try:
        loop.train_and_evaluate(config, _WORKDIR.value)
    except (NonFiniteLossError, ValueError) as e:
        if not type(e).__module__.startswith("sdjax"):
            raise
        logging.error("%s: %s", type(e).__name__, e)
        sys.exit(f"train.py: {type(e).__name__}: {e}")


def _config_override_error(argv: list[str], error: Exception) -> str:
    """One line for a --config.<field> override that does not apply, with close matches among the fields."""
    import difflib
    import importlib.util

    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    fields: list[str] = []
    if spec:
        path, _, arg = spec.partition(":")
        try:
            module_spec = importlib.util.spec_from_file_location("_train_config", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
            config = module.get_config(arg or None)
            fields = [k for k, _ in _flatten(config.to_dict())]
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


def _flatten(tree: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out += _flatten(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


if __name__ == "__main__":
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
