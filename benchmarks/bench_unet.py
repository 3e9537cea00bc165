"""One UNet evaluation, SD 1.5 architecture, same random weights in sdjax and diffusers (PyTorch), CPU float32.

    python benchmarks/bench_unet.py [--repeats 5] [--latent 32] [--batch 2]

Batch 2 at 32x32 latents is one classifier-free-guided step of a 256x256 image. Prints a Markdown table: median
seconds per evaluation after warm-up for both libraries and their ratio, sdjax compile time, load time from the
saved diffusers folder, and XLA's cost-analysis FLOPs per evaluation.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import torch

from benchmarks.common import SD15_UNET, median_seconds, print_table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    from diffusers import UNet2DConditionModel

    from sdjax.weights import load_component

    torch.manual_seed(0)
    torch_unet = UNet2DConditionModel(**SD15_UNET).eval()
    b, s = args.batch, args.latent
    x = np.random.default_rng(0).standard_normal((b, s, s, 4)).astype(np.float32)
    context = np.random.default_rng(1).standard_normal((b, 77, 768)).astype(np.float32)
    t = np.full((b,), 500, np.int32)

    with tempfile.TemporaryDirectory() as tmp:
        torch_unet.save_pretrained(tmp, safe_serialization=True)
        start = time.perf_counter()
        unet, params = load_component(Path(tmp))
        jax.block_until_ready(params)
        load_s = time.perf_counter() - start

    apply = jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, c))
    start = time.perf_counter()
    compiled = apply.lower(params, x, t, context).compile()
    compile_s = time.perf_counter() - start
    flops = (compiled.cost_analysis() or {}).get("flops", float("nan"))
    if isinstance(compiled.cost_analysis(), list):  # older JAX returns one dict per device
        flops = compiled.cost_analysis()[0].get("flops", float("nan"))
    jax_s = median_seconds(lambda: jax.block_until_ready(compiled(params, x, t, context)), args.repeats)
    out_jax = np.asarray(compiled(params, x, t, context))

    xt, ct, tt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(context), torch.from_numpy(t)
    with torch.no_grad():
        torch_s = median_seconds(lambda: torch_unet(xt, tt, ct), args.repeats)
        out_torch = torch_unet(xt, tt, ct).sample.numpy().transpose(0, 2, 3, 1)
    rel = np.abs(out_jax - out_torch).max() / np.abs(out_torch).max()

    print_table(
        f"SD 1.5 UNet, batch {b}, {s}x{s} latents, float32, {jax.devices()[0].device_kind} "
        f"({torch.get_num_threads()} torch threads)",
        [
            ("diffusers (PyTorch) s/eval", f"{torch_s:.3f}"),
            ("sdjax s/eval", f"{jax_s:.3f}"),
            ("speed-up (diffusers / sdjax)", f"{torch_s / jax_s:.2f}x"),
            ("sdjax compile s", f"{compile_s:.1f}"),
            ("sdjax load s (from safetensors)", f"{load_s:.1f}"),
            ("XLA GFLOPs / eval", f"{flops / 1e9:.1f}"),
            ("max rel diff sdjax vs diffusers", f"{rel:.1e}"),
        ],
    )


if __name__ == "__main__":
    main()
