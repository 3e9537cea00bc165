"""LoRA fused into the params vs applied on the fly, SD 1.5 UNet widths, random weights and a random LoRA.

    python -m benchmarks.bench_lora [--rank 16] [--latent 32] [--batch 2] [--repeats 3]

The LoRA targets every attention projection, feed-forward layer, proj_in/proj_out and ResNet conv1/conv2 (3x3,
LoCon) of the UNet. Fused: :func:`sdjax.loading.lora.merged_params` (what the pipeline does on load and on every
``set_adapters``), then the plain UNet. Unfused: the base params plus, in every targeted Dense/Conv, the low-rank
branch ``scale * up(down(x))`` with a traced scale (flax method interception), as PEFT runs it. Batch 2 is one
classifier-free-guided step of one image. Prints a Markdown table of median seconds.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from benchmarks.common import SD15_UNET, median_seconds, print_table
from sdjax.loading import lora
from sdjax.models.unet import UNet2DConditionConfig, UNet2DConditionModel
from sdjax.weights import param_shapes

TARGETS = ("to_q", "to_k", "to_v", "to_out_0", "proj", "net_2", "proj_in", "proj_out", "conv1", "conv2")


def random_params(shapes, rng: np.random.Generator):
    """Small random params of the given shapes (float32), built on the host."""
    return jax.tree.map(lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape, np.float32)), shapes)


def random_lora(params, rank: int, rng: np.random.Generator) -> lora.LoraAdapter:
    layers = []
    for path, kernel in traverse_util.flatten_dict(params).items():
        if path[-1] != "kernel" or path[-2] not in TARGETS:
            continue
        out, down_shape = kernel.shape[0], (rank, *kernel.shape[1:])  # kernel (out, in[, kh, kw])
        down = jnp.asarray(rng.standard_normal(down_shape, np.float32) * 0.01)
        up = jnp.asarray(rng.standard_normal((out, rank), np.float32) * 0.01)
        layers.append(lora.LoraLayer("unet", path, down, up, 1.0))
    return lora.LoraAdapter("bench", "<memory>", "kohya", tuple(layers))


def unfused_apply(unet, adapter: lora.LoraAdapter):
    """jitted (params, factors, scale, x, t, context) -> UNet output with the LoRA branches computed on the fly."""
    paths = [layer.path[:-1] for layer in adapter.layers]

    @jax.jit
    def apply(params, factors, scale, x, t, context):
        by_path = dict(zip(paths, factors, strict=True))

        def interceptor(next_fun, args, kwargs, ctx):
            y = next_fun(*args, **kwargs)
            path = ("unet", *ctx.module.path) if ctx.method_name == "__call__" else None
            if path is None or path[1:] not in by_path:
                return y
            down, up = by_path[path[1:]]
            h = args[0]
            if down.ndim == 4:  # conv: down is a conv with the layer's kernel, up a 1x1 conv
                h = jax.lax.conv_general_dilated(h, down, (1, 1), "SAME", dimension_numbers=("NHWC", "OIHW", "NHWC"))
            else:
                h = h @ down.T
            return y + scale * (h @ up.T)

        with nn.intercept_methods(interceptor):
            return unet.apply({"params": params}, x, t, context)

    return apply


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    unet = UNet2DConditionModel(UNet2DConditionConfig.from_dict(SD15_UNET))
    params = random_params(param_shapes(unet), rng)
    adapter = random_lora(params, args.rank, rng)
    state = lora.add_adapter(lora.LoraState(base={"unet": params}), adapter, 1.0)
    b, s = args.batch, args.latent
    x = jnp.asarray(rng.standard_normal((b, s, s, 4), np.float32))
    context = jnp.asarray(rng.standard_normal((b, 77, 768), np.float32))
    t = jnp.full((b,), 500, jnp.int32)

    start = time.perf_counter()
    jax.block_until_ready(lora.merged_params(state))
    merge_first = time.perf_counter() - start
    reweighted = lora.set_adapters(state, ["bench"], [0.6])
    merge = median_seconds(lambda: jax.block_until_ready(lora.merged_params(reweighted)), args.repeats)
    merged = lora.merged_params(state)["unet"]

    fused = jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, c))
    start = time.perf_counter()
    jax.block_until_ready(fused(merged, x, t, context))
    fused_compile = time.perf_counter() - start
    fused_step = median_seconds(lambda: jax.block_until_ready(fused(merged, x, t, context)), args.repeats, 0)

    unfused = unfused_apply(unet, adapter)
    factors = [(layer.down, layer.up) for layer in adapter.layers]
    start = time.perf_counter()
    jax.block_until_ready(unfused(params, factors, jnp.float32(1.0), x, t, context))
    unfused_compile = time.perf_counter() - start
    unfused_step = median_seconds(
        lambda: jax.block_until_ready(unfused(params, factors, jnp.float32(0.6), x, t, context)), args.repeats, 0
    )
    lora_mb = sum(layer.down.size + layer.up.size for layer in adapter.layers) * 4 / 2**20
    print_table(
        f"LoRA rank {args.rank} on {len(adapter.layers)} UNet layers ({lora_mb:.0f} MB), SD 1.5 widths, batch {b}, "
        f"{s}x{s} latents, {jax.devices()[0].platform} float32",
        [
            ("fused: first merge (incl. compile), s", f"{merge_first:.2f}"),
            ("fused: merge per set_adapters, s", f"{merge:.3f}"),
            ("fused: UNet step (= base model), s", f"{fused_step:.3f}"),
            ("unfused (traced scales): UNet step, s", f"{unfused_step:.3f}"),
            ("unfused overhead per step, s", f"{unfused_step - fused_step:.3f}"),
            ("unfused overhead, 50-step image, s", f"{50 * (unfused_step - fused_step):.2f}"),
            ("compile: fused / unfused UNet, s", f"{fused_compile:.1f} / {unfused_compile:.1f}"),
        ],
    )


if __name__ == "__main__":
    main()
