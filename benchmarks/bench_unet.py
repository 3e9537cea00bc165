"""One UNet evaluation, SD 1.5 architecture, same random weights in sdjax and diffusers (PyTorch), CPU.

    python -m benchmarks.bench_unet [--repeats 5] [--latent 32] [--batch 2] [--dtype float32 bfloat16]
    python -m benchmarks.bench_unet --sweep-flags    # each XLA:CPU flag set of FLAG_SETS in its own process

Batch 2 at 32x32 latents is one classifier-free-guided step of a 256x256 image. The two libraries' repetitions
are interleaved (sdjax, diffusers, sdjax, ...) and each reports its fastest, so that other load on the machine
hits both alike; the load average is printed with the table. Prints a Markdown table: seconds per evaluation for
both libraries and their ratio per dtype, sdjax compile time, XLA's cost-analysis FLOPs, and the largest
difference between the two outputs.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import SD15_UNET, print_table
from sdjax.platform import CPU_XLA_FLAGS, configure_cpu

# The XLA:CPU flag sets --sweep-flags compares (each needs a fresh process: XLA reads XLA_FLAGS once).
FLAG_SETS = {
    "none": "",
    "sdjax default (sdjax.platform.CPU_XLA_FLAGS)": " ".join(CPU_XLA_FLAGS),
    "xnn conv+dot": "--xla_cpu_experimental_xnn_fusion_type=individual_convolution,individual_dot",
    "onednn": "--xla_cpu_use_onednn=true",
    "onednn custom call": "--xla_cpu_experimental_onednn_custom_call=true",
}


def interleaved_min(fns: dict[str, object], repeats: int) -> dict[str, float]:
    """Fastest wall time of each zero-argument callable, after one warm-up, running them in turn."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def measure(dtype_name: str, repeats: int, batch: int, latent: int, torch_unet, params) -> dict[str, float]:
    """Seconds per evaluation of sdjax and diffusers (interleaved), sdjax compile seconds, GFLOPs, max rel diff."""
    import torch

    from sdjax.models.unet import UNet2DConditionConfig, UNet2DConditionModel

    dtype = jnp.dtype(dtype_name)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    unet = UNet2DConditionModel(UNet2DConditionConfig.from_dict(dict(SD15_UNET)), dtype=dtype)
    p = jax.device_put(jax.tree.map(lambda a: np.asarray(a).astype(dtype), params))
    x = np.random.default_rng(0).standard_normal((batch, latent, latent, 4)).astype(np.float32)
    context = np.random.default_rng(1).standard_normal((batch, 77, 768)).astype(np.float32)
    t = np.full((batch,), 500, np.int32)
    xj, cj = jnp.asarray(x, dtype), jnp.asarray(context, dtype)

    start = time.perf_counter()
    compiled = jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, c)).lower(p, xj, t, cj).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    flops = (cost[0] if isinstance(cost, list) else cost or {}).get("flops", float("nan"))

    model = copy.deepcopy(torch_unet).to(torch_dtype) if torch_dtype != torch.float32 else torch_unet
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(torch_dtype)
    ct, tt = torch.from_numpy(context).to(torch_dtype), torch.from_numpy(t)
    with torch.no_grad():
        times = interleaved_min(
            {"sdjax": lambda: jax.block_until_ready(compiled(p, xj, t, cj)), "diffusers": lambda: model(xt, tt, ct)},
            repeats,
        )
        out_torch = model(xt, tt, ct).sample.float().numpy().transpose(0, 2, 3, 1)
    out_jax = np.asarray(compiled(p, xj, t, cj), np.float32)
    rel = float(np.abs(out_jax - out_torch).max() / np.abs(out_torch).max())
    return {**times, "compile": compile_s, "gflops": flops / 1e9, "rel": rel}


def sweep_flags(args: argparse.Namespace) -> None:
    rows = []
    for name, flags in FLAG_SETS.items():
        cmd = [sys.executable, "-m", "benchmarks.bench_unet", "--json", "--repeats", str(args.repeats)]
        cmd += ["--batch", str(args.batch), "--latent", str(args.latent), "--dtype", *args.dtype]
        env = {**os.environ, "XLA_FLAGS": flags}
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
        for dtype, r in json.loads(out.stdout.strip().splitlines()[-1]).items():
            ratio = r["diffusers"] / r["sdjax"]
            rows.append((f"{name} [{flags or '-'}] {dtype}", f"sdjax {r['sdjax']:.2f} s, diffusers "
                         f"{r['diffusers']:.2f} s, ratio {ratio:.2f}x, load {r['load']:.1f}"))  # fmt: skip
    print_table(f"SD 1.5 UNet, batch {args.batch}, {args.latent}x{args.latent} latents, XLA:CPU flag sets", rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=("float32", "bfloat16"))
    parser.add_argument("--sweep-flags", action="store_true", help="compare the XLA:CPU flag sets of FLAG_SETS")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sweep_flags:
        sweep_flags(args)
        return
    import torch

    from benchmarks.profile_unet import sd15_unet_weights

    torch_unet, params = sd15_unet_weights()
    results = {}
    for dtype in args.dtype:
        results[dtype] = measure(dtype, args.repeats, args.batch, args.latent, torch_unet, params)
        results[dtype]["load"] = os.getloadavg()[0]
    if args.json:
        print(json.dumps(results))
        return
    rows = []
    for dtype, r in results.items():
        rows += [
            (f"{dtype}: diffusers (PyTorch) s/eval", f"{r['diffusers']:.3f}"),
            (f"{dtype}: sdjax s/eval", f"{r['sdjax']:.3f}"),
            (f"{dtype}: speed ratio (diffusers time / sdjax time)", f"{r['diffusers'] / r['sdjax']:.2f}x"),
            (f"{dtype}: sdjax compile s", f"{r['compile']:.1f}"),
            (f"{dtype}: max rel diff sdjax vs diffusers", f"{r['rel']:.1e}"),
            (f"{dtype}: load average (1 min) after", f"{r['load']:.2f}"),
        ]
    rows.append(("XLA GFLOPs / eval (float32 program)", f"{results.get('float32', r)['gflops']:.1f}"))
    print_table(
        f"SD 1.5 UNet, batch {args.batch}, {args.latent}x{args.latent} latents, CPU ({torch.get_num_threads()} "
        f"torch threads, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}), fastest of {args.repeats} interleaved",
        rows,
    )


if __name__ == "__main__":
    configure_cpu()
    main()
