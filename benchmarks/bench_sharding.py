"""Memory of sharded training, measured: per-device memory of the SD 1.5 and SDXL-base full fine-tune step under
data parallelism and fsdp, and the peak host memory of a real training job on 4 fake CPU devices.

    python -m benchmarks.bench_sharding [--models sd15,sdxl] [--devices 1,4,8,16] [--skip-compile] [--skip-rss]

Part 1 compiles the train loop's own update step (sdjax.parallel.jit_train_step of the diffusion stage's loss) for
the published SD 1.5 and SDXL-base architectures (tests/fixtures/published: configs only, no weights) from abstract
shapes (``jax.ShapeDtypeStruct`` with shardings: nothing is allocated) on 1, 4, 8 and 16 fake CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=N, one process per N), with bfloat16 compute, rematerialised
UNet blocks, float32 master weights, AdamW, EMA on, one example per device (512x512 for SD 1.5, 1024x1024 for
SDXL), and prints ``compiled.memory_analysis()`` per device: arguments (state, frozen networks, batch), outputs,
temporaries, and their sum less the donated (aliased) outputs. Attention is XLA's ``jax.nn.dot_product_attention``
(what TPUs run; the CPU-only blocked attention of sdjax.models.layers is bypassed). XLA:CPU's buffer assignment
is not a TPU's (layouts, padding, fusion differ), so temporaries are estimates; the state's share is exact.

Part 2 trains a real (small) model for a few steps on 4 fake CPU devices, data-parallel and then fsdp=4, each in its
own process, and prints each process's peak RSS (all fake devices share the host's memory, so replicated state
costs 4 copies there) and the size of the train state.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import print_table

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = ROOT / "tests" / "fixtures" / "published"
MODELS = {  # published folder, training config, image side
    "sd15": ("sd15", "configs/sd15_finetune.py", 512),
    "sdxl": ("sdxl_base", "configs/sdxl_finetune.py", 1024),
}
GIB = 2**30
# XLA:CPU flags of the compile-only children: LLVM optimisation changes the machine code, not the HLO buffer
# assignment that memory_analysis() reports (checked: SD 1.5 on one device, the same bytes with and without).
FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")


def load_config(spec: str) -> Any:
    from benchmarks.bench_train import load_config as load

    return load(spec)


# ----------------------------------------------------------------------------------------------- part 1: compile


def abstract_model(name: str) -> tuple[Any, Any, dict]:
    """(config, sdjax.train.model.Model whose frozen params are ``jax.ShapeDtypeStruct``, batch features) of the
    published architecture ``name``: bfloat16 compute, remat, EMA on, no gradient accumulation."""
    import jax
    import jax.numpy as jnp

    from sdjax import loading, schedule, tokenizer, weights
    from sdjax.loading import folders
    from sdjax.train import model as model_lib

    folder_name, config_spec, size = MODELS[name]
    folder = PUBLISHED / folder_name
    config = load_config(config_spec)
    config.update(dtype="bfloat16", remat=True, ema_decay=0.9999, grad_accum_steps=1)
    config.data.resolution = size
    index = folders.read_model_index(folder)
    layout = folders.layout_of(index, folder)
    dtype = jnp.bfloat16
    dtypes = loading.network_dtypes(folder, layout, dtype)
    modules, frozen = {}, {}
    for network in folders.present_networks(index, layout):
        module = weights.build_component(folder / network, dtypes.get(network, dtype))
        modules[network] = module
        if network != "unet":
            shapes = weights.param_shapes(module)
            frozen[network] = jax.tree.map(lambda s, d=module.dtype: jax.ShapeDtypeStruct(s.shape, d), shapes)
    modules["unet"] = modules["unet"].clone(remat=True)
    tok = tokenizer.clip_tokenizer()
    model = model_lib.Model(
        modules, frozen, tokenizer=tok, family=layout.family, tokenizer_2=tok,
        schedule=schedule.ScheduleConfig.from_json_file(folder / "scheduler" / "scheduler_config.json"),
        options={key: index.get(key, default) for key, default in layout.options.items()},
    )  # fmt: skip
    features = {"input_ids": ((77,), np.int32)}
    if layout.family == "sdxl":
        features.update(input_ids_2=((77,), np.int32), original_size=((2,), np.int32), crop_top_left=((2,), np.int32))
    return config, model, features


def _xla_attention(q, k, v, *, upcast: bool = False, is_causal: bool = False):
    import jax
    import jax.numpy as jnp

    out_dtype = q.dtype
    if upcast:
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal).astype(out_dtype)


def compile_memory(name: str, fsdp: int) -> dict[str, float]:
    """memory_analysis() of the update step of ``name`` on every device of this process, fsdp over ``fsdp``."""
    import jax

    from sdjax import parallel
    from sdjax.models import layers
    from sdjax.train import diffusion_stage, steps
    from sdjax.train import model as model_lib
    from sdjax.train import state as state_lib

    layers.dot_product_attention = _xla_attention  # the accelerators' attention, not the CPU's blocked one
    config, model, features = abstract_model(name)
    mesh = parallel.make_mesh(fsdp=fsdp)
    tx = state_lib.make_optimizer(config)
    params = model_lib.param_shapes(config, model)
    state = jax.eval_shape(lambda p: state_lib.create_train_state(p, tx, ema=True), params)
    state = parallel.abstract(state, parallel.shardings(state, mesh))
    frozen = parallel.abstract(model.frozen, parallel.shardings(model.frozen, mesh))
    n, size = jax.device_count(), config.data.resolution
    rows = {"image": ((size, size, 3), np.float32), **features}
    batch = {k: jax.ShapeDtypeStruct((n, *shape), dtype, sharding=parallel.batch_sharding(mesh))
             for k, (shape, dtype) in rows.items()}  # fmt: skip
    step = steps.make_train_step(diffusion_stage.DiffusionStage().loss_fn(config, model), config)
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=parallel.replicated(mesh))
    start = time.perf_counter()
    compiled = parallel.jit_train_step(step, state, frozen).lower(state, frozen, batch, rng).compile()
    seconds = time.perf_counter() - start
    m = compiled.memory_analysis()
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return {
        "devices": n, "fsdp": fsdp, "compile_s": seconds, "state_gib": state_bytes / GIB,
        "arguments_gib": m.argument_size_in_bytes / GIB, "outputs_gib": m.output_size_in_bytes / GIB,
        "aliased_gib": m.alias_size_in_bytes / GIB, "temporaries_gib": m.temp_size_in_bytes / GIB,
        "total_gib": total / GIB,
        "params_m": sum(x.size for x in jax.tree.leaves(params)) / 1e6,
    }  # fmt: skip


def child(env_devices: int, args: list[str], compile_only: bool = False) -> list[dict]:
    """Runs ``python -m benchmarks.bench_sharding <args>`` with ``env_devices`` CPU devices; its JSON lines."""
    # Unoptimised LLVM code: the compile (buffer assignment included) is the same program, done sooner.
    flags = f"--xla_force_host_platform_device_count={env_devices} {' '.join(FAST_COMPILE) * compile_only}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_sharding", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"bench_sharding {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def bench_compile(models: list[str], device_counts: list[int], max_dp_devices: int | None = None) -> None:
    """Prints part 1's table, one model at a time (data-parallel rows only up to ``max_dp_devices`` devices: their
    per-device memory does not depend on the device count)."""
    for name in models:
        rows = []
        for n in device_counts:
            layouts = sorted({1, n}) if max_dp_devices is None or n <= max_dp_devices else [n]
            for fsdp in layouts:
                r = child(n, ["--child-compile", name, "--fsdp", str(fsdp)], compile_only=True)[0]
                layout = "1 device" if n == 1 else ("data-parallel" if fsdp == 1 else f"fsdp={fsdp}")
                rows.append((f"{n} | {layout}", r))
                parts = " ".join(f"{k[:-4]} {r[k]:.2f}" for k in ("arguments_gib", "outputs_gib", "temporaries_gib",
                                                                     "aliased_gib"))  # fmt: skip
                done = f"{r['total_gib']:.2f} GiB/device ({parts}; {r['compile_s']:.0f} s compile)"
                print(f"  {name} {n} devices {layout}: {done}", file=sys.stderr, flush=True)
        first = rows[0][1]
        print(f"\n{name}: UNet {first['params_m']:.0f}M params; state (float32 params, AdamW moments, EMA) "
              f"{first['state_gib']:.1f} GiB; per device, GiB\n")  # fmt: skip
        print("| devices | layout | arguments | outputs | temporaries | aliased | total |")
        print("|---|---|---|---|---|---|---|")
        for label, r in rows:
            cells = [f"{r[k]:.2f}" for k in ("arguments_gib", "outputs_gib", "temporaries_gib", "aliased_gib")]
            print(f"| {label} | {' | '.join(cells)} | {r['total_gib']:.2f} |")


# ----------------------------------------------------------------------------------------------- part 2: host RSS

RSS_STEPS = 3
RSS_VAE = dict(  # ~21M parameters: the state (x4 with Adam's moments and EMA) dominates the process's memory
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(64, 128, 256, 256), layers_per_block=2,
    latent_channels=4, norm_num_groups=32, sample_size=32,
)  # fmt: skip


def rss_run(fsdp: int) -> dict[str, float]:
    """A stage-1 (VAE) training job of RSS_STEPS steps on synthetic 32x32 batches on every device of this process,
    fsdp over ``fsdp``; returns the peak RSS and the state size."""
    import jax

    from sdjax.train import loop

    config = load_config("configs/shapes64_vae.py")
    config.vae = RSS_VAE
    config.update(steps=RSS_STEPS, batch_size=jax.device_count(), checkpoint_every=RSS_STEPS, log_every=1,
                  async_checkpoints=False, eval_every=0)  # fmt: skip
    config.data.resolution = 32
    config.mesh.update(fsdp=fsdp)

    def batches(position: int):
        while True:
            rng = np.random.default_rng(position)
            yield {"image": rng.uniform(-1, 1, (1, jax.device_count(), 32, 32, 3)).astype(np.float32)}
            position += 1

    with tempfile.TemporaryDirectory() as workdir:
        final = loop.train_and_evaluate(config, workdir, batches_fn=batches)
    state = (final.params, final.opt_state, final.ema_params)
    return {
        "fsdp": fsdp, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "state_gib": sum(np.asarray(x).nbytes for x in jax.tree.leaves(state)) / GIB,
        "params_m": sum(np.asarray(x).size for x in jax.tree.leaves(final.params)) / 1e6,
    }  # fmt: skip


def bench_rss() -> None:
    """Prints part 2's table."""
    dp, fsdp = (child(4, ["--child-rss", "--fsdp", str(f)])[0] for f in (1, 4))
    saved = dp["peak_rss_gib"] - fsdp["peak_rss_gib"]
    print_table(
        f"Peak host RSS of a {RSS_STEPS}-step VAE training job ({dp['params_m']:.1f}M params) on 4 fake CPU devices",
        [
            ("train state (params, AdamW moments, EMA) GiB", f"{dp['state_gib']:.2f}"),
            ("peak RSS, data-parallel (4 state copies) GiB", f"{dp['peak_rss_gib']:.2f}"),
            ("peak RSS, fsdp=4 (1 state copy in quarters) GiB", f"{fsdp['peak_rss_gib']:.2f}"),
            ("difference GiB", f"{saved:.2f}"),
            ("difference / state size", f"{saved / dp['state_gib']:.2f} copies"),
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="sd15,sdxl", help="comma-separated: sd15, sdxl")
    parser.add_argument("--devices", default="1,4,8,16", help="comma-separated fake device counts")
    parser.add_argument("--skip-compile", action="store_true", help="skip part 1 (the compiled memory tables)")
    parser.add_argument("--max-dp-devices", type=int, default=None, help="data-parallel rows only up to this many")
    parser.add_argument("--skip-rss", action="store_true", help="skip part 2 (the training job's host RSS)")
    parser.add_argument("--child-compile", choices=tuple(MODELS), help=argparse.SUPPRESS)
    parser.add_argument("--child-rss", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fsdp", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_compile:
        print(json.dumps(compile_memory(args.child_compile, args.fsdp)))
        return
    if args.child_rss:
        print(json.dumps(rss_run(args.fsdp)))
        return
    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"--models: unknown {unknown}; accepted: {', '.join(MODELS)}")
    print(f"bench_sharding, {time.strftime('%Y-%m-%d')}, load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if not args.skip_compile:
        bench_compile(models, [int(n) for n in args.devices.split(",")], args.max_dp_devices)
    if not args.skip_rss:
        bench_rss()


if __name__ == "__main__":
    main()
