"""Training speed, CPU float32: the shapes64 stage-2 update step, and one SD 1.5-architecture UNet training step in
sdjax vs diffusers (PyTorch) on the same random weights.

    python -m benchmarks.bench_train [--repeats 3] [--skip-sd15] [--sd15-size 256]

Part 1 times the train loop's own jitted update step for configs/shapes64.py (frozen VAE encode, text encoder,
UNet forward and backward, AdamW, EMA) on one device, with random-init params (no stage-1 VAE needed) and a
synthetic batch of the config's batch size. Part 2 is the UNet-only part of SD 1.5 training at --sd15-size pixels,
batch 1: latents and a (1, 77, 768) text context given, then noise, add_noise, UNet forward and backward, MSE to
the noise, AdamW. Its two libraries run in their own subprocesses so that peak memory (max RSS) is their own.
Prints Markdown tables: median seconds per step after warm-up, images/s, compile time, peak memory.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from benchmarks.common import SD15_UNET, median_seconds, print_table

ROOT = Path(__file__).resolve().parents[1]
# AdamW settings shared by both libraries in part 2 (torch.optim.AdamW's defaults except the learning rate).
LR, BETAS, EPS, WEIGHT_DECAY = 1e-5, (0.9, 0.999), 1e-8, 1e-2


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def load_config(spec: str) -> ml_collections.ConfigDict:
    """The ConfigDict of ``spec`` = "configs/<file>.py[:arg]" (relative to the repo root), as train.py reads it."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


# ----------------------------------------------------------------------------------------------- part 1: shapes64


def shapes64_setup(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The jitted stage-2 step of ``config`` on one device with its random-init state, frozen VAE params, a
    synthetic batch {"image": (B, R, R, 3) float32 in [-1, 1], "input_ids": (B, 77) int32} and the run's rng, placed
    as the train loop places them (sdjax.parallel)."""
    from sdjax import parallel, schedule
    from sdjax.loading import folders
    from sdjax.models.vae import AutoencoderKL, AutoencoderKLConfig
    from sdjax.train import diffusion_stage
    from sdjax.train import model as model_lib
    from sdjax.train import state as state_lib
    from sdjax.train import steps as steps_lib

    dtype, rng = model_lib.compute_dtype(config), jax.random.key(config.seed)
    with tempfile.TemporaryDirectory() as scratch:
        tok = diffusion_stage._new_tokenizers(config, folders.SD, Path(scratch))["tokenizer"]
    networks = diffusion_stage._new_networks(config, folders.SD, tok)
    vae = AutoencoderKL(AutoencoderKLConfig.from_dict(load_config(config.vae_config).vae.to_dict()))
    modules = {"vae": vae.clone(dtype=dtype), **{name: m.clone(dtype=dtype) for name, m in networks.items()}}
    if config.remat:
        modules["unet"] = modules["unet"].clone(remat=True)
    model = model_lib.Model(
        modules, {"vae": model_lib.init_params(vae, jax.random.fold_in(rng, 2))}, tokenizer=tok,
        schedule=schedule.ScheduleConfig.from_dict(config.schedule.to_dict()),
    )  # fmt: skip
    mesh = parallel.make_mesh(devices=jax.local_devices()[:1])
    params = model_lib.initial_params(config, model, jax.random.fold_in(rng, 1))
    state = state_lib.create_train_state(
        params, state_lib.make_optimizer(config), ema=config.ema_decay > 0, accumulation_steps=config.grad_accum_steps
    )
    state = parallel.place(state, parallel.shardings(state, mesh))
    frozen = parallel.place(model.frozen, parallel.shardings(model.frozen, mesh))
    step = steps_lib.make_train_step(diffusion_stage.DiffusionStage().loss_fn(config, model), config)
    b, r = config.batch_size, config.data.resolution
    data_rng = np.random.default_rng(0)
    batch = {
        "image": data_rng.uniform(-1, 1, (1, b, r, r, 3)).astype(np.float32),
        "input_ids": data_rng.integers(0, len(tok), (1, b, 77)).astype(np.int32),
    }
    return {
        "p_step": parallel.jit_train_step(step, state, frozen),
        "state": state,
        "frozen": frozen,
        "batch": parallel.put_batch(batch, mesh),
        "rng": rng,
        "num_params": {name: sum(x.size for x in jax.tree.leaves(p)) for name, p in params.items()},
    }


def bench_shapes64(repeats: int) -> None:
    """Prints the table of part 1."""
    config = load_config("configs/shapes64.py")
    s = shapes64_setup(config)
    start = time.perf_counter()
    compiled = s["p_step"].lower(s["state"], s["frozen"], s["batch"], s["rng"]).compile()
    compile_s = time.perf_counter() - start
    state = [s["state"]]  # the step donates its state: each call consumes the previous one

    def train_step() -> None:
        state[0], metrics = compiled(state[0], s["frozen"], s["batch"], s["rng"])
        jax.block_until_ready((state[0], metrics))

    seconds = median_seconds(train_step, repeats)
    b, r = config.batch_size, config.data.resolution
    trained = " + ".join(f"{name} {n / 1e6:.2f}M" for name, n in s["num_params"].items())
    print_table(
        f"shapes64 stage-2 training step (configs/shapes64.py): batch {b}, {r}x{r} images, {config.dtype}, "
        f"1 {jax.devices()[0].device_kind} device",
        [
            ("sdjax s/step", f"{seconds:.3f}"),
            ("sdjax images/s", f"{b / seconds:.1f}"),
            ("sdjax compile s", f"{compile_s:.1f}"),
            ("trained params", trained),
        ],
    )


# ----------------------------------------------------------------------------------------------- part 2: SD 1.5


def build_sd15_unet(folder: str) -> None:
    """Saves a random-init diffusers ``UNet2DConditionModel(**SD15_UNET)`` (seed 0) to ``folder`` (safetensors)."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    UNet2DConditionModel(**SD15_UNET).save_pretrained(folder, safe_serialization=True)


def sd15_inputs(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Latents (1, size/8, size/8, 4) and text context (1, 77, 768), float32 standard normal, the same in both
    libraries."""
    latents = np.random.default_rng(0).standard_normal((1, size // 8, size // 8, 4)).astype(np.float32)
    context = np.random.default_rng(1).standard_normal((1, 77, 768)).astype(np.float32)
    return latents, context


def sd15_diffusers(folder: str, size: int, repeats: int) -> dict[str, float]:
    """Median seconds of a diffusers (PyTorch) UNet training step and the process's peak memory."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder).train()
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    latents_nhwc, context = sd15_inputs(size)
    latents, context = torch.from_numpy(latents_nhwc.transpose(0, 3, 1, 2).copy()), torch.from_numpy(context)
    torch.manual_seed(0)

    def train_step() -> None:
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],))
        noisy = scheduler.add_noise(latents, noise, t)
        loss = F.mse_loss(unet(noisy, t, context).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    seconds = median_seconds(train_step, repeats)
    return {"seconds": seconds, "threads": torch.get_num_threads(), "peak_gb": _peak_gb()}


def make_unet_train_step(unet: Any, tx: Any, alphas_cumprod: jax.Array):
    """Jitted (params, opt_state, latents (B, h, w, 4), context (B, 77, D), key) -> (params, opt_state, key, loss):
    epsilon-prediction MSE on uniformly sampled timesteps, one ``tx`` update; params and opt_state donated."""
    import optax

    from sdjax import schedule

    def step(params, opt_state, latents, context, key):
        key, noise_key, t_key = jax.random.split(key, 3)
        noise = jax.random.normal(noise_key, latents.shape, jnp.float32)
        t = jax.random.randint(t_key, (latents.shape[0],), 0, alphas_cumprod.shape[0])
        noisy = schedule.add_noise(alphas_cumprod, latents, noise, t)

        def loss_fn(p):
            return jnp.mean(jnp.square(unet.apply({"params": p}, noisy, t, context) - noise))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, key, loss

    return jax.jit(step, donate_argnums=(0, 1))


def sd15_sdjax(folder: str, size: int, repeats: int) -> dict[str, float]:
    """Median seconds of an sdjax UNet training step (weights loaded from ``folder``), its compile time and the
    process's peak memory."""
    import optax

    from sdjax import schedule
    from sdjax.weights import load_component

    unet, params = load_component(folder)
    tx = optax.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WEIGHT_DECAY)
    carry = [params, tx.init(params), jax.random.key(0)]
    latents, context = (jnp.asarray(x) for x in sd15_inputs(size))
    step = make_unet_train_step(unet, tx, schedule.alphas_cumprod(schedule.ScheduleConfig()))
    start = time.perf_counter()
    compiled = step.lower(*carry[:2], latents, context, carry[2]).compile()
    compile_s = time.perf_counter() - start

    def train_step() -> None:
        params, opt_state, key, loss = compiled(carry[0], carry[1], latents, context, carry[2])
        carry[:] = [params, opt_state, key]
        jax.block_until_ready((params, opt_state, loss))

    seconds = median_seconds(train_step, repeats)
    return {"seconds": seconds, "compile_s": compile_s, "peak_gb": _peak_gb()}


def _run_child(only: str, folder: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_train", "--only", only, "--folder", folder]
    cmd += ["--sd15-size", str(args.sd15_size), "--repeats", str(args.repeats)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    out = done.stdout.strip()
    return json.loads(out.splitlines()[-1]) if out else {}


def bench_sd15(args: argparse.Namespace) -> None:
    """Prints the table of part 2."""
    size = args.sd15_size
    with tempfile.TemporaryDirectory() as tmp:
        _run_child("build", tmp, args)
        d, j = _run_child("diffusers", tmp, args), _run_child("sdjax", tmp, args)
    print_table(
        f"SD 1.5 UNet training step: {size}x{size} images ({size // 8}x{size // 8} latents), batch 1, float32, "
        f"AdamW, CPU ({d['threads']} torch threads)",
        [
            ("diffusers (PyTorch) s/step", f"{d['seconds']:.2f}"),
            ("sdjax s/step", f"{j['seconds']:.2f}"),
            ("speed-up (diffusers / sdjax)", f"{d['seconds'] / j['seconds']:.2f}x"),
            ("sdjax compile s", f"{j['compile_s']:.1f}"),
            ("peak memory diffusers GB", f"{d['peak_gb']:.1f}"),
            ("peak memory sdjax GB", f"{j['peak_gb']:.1f}"),
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-sd15", action="store_true", help="run only the shapes64 step")
    parser.add_argument("--sd15-size", type=int, default=256, help="image side of the SD 1.5 step (latents: /8)")
    parser.add_argument("--only", choices=("build", "diffusers", "sdjax"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sd15_size < 8 or args.sd15_size % 8:
        parser.error(f"--sd15-size={args.sd15_size}: it must be a positive multiple of 8 (the VAE's downsampling)")
    if args.only == "build":
        build_sd15_unet(args.folder)
    elif args.only:
        run = sd15_diffusers if args.only == "diffusers" else sd15_sdjax
        print(json.dumps(run(args.folder, args.sd15_size, args.repeats)))
    else:
        bench_shapes64(args.repeats)
        if not args.skip_sd15:
            bench_sd15(args)


if __name__ == "__main__":
    main()
