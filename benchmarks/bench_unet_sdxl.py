"""One SDXL UNet evaluation, same random weights in sdjax and diffusers (PyTorch), CPU, small latents.

    python -m benchmarks.bench_unet_sdxl [--repeats 3] [--latent 32] [--batch 2] [--width 0.5]

The network is the published SDXL base UNet's layout (tests/fixtures/published/sdxl_base/unet/config.json:
DownBlock2D first, transformer depths [1, 2, 10], linear projections, 2048-wide context, ``text_time`` added
conditioning with 6 time ids) with its block widths scaled by ``--width`` (0.5 by default: the full 2.57 B
parameters in float32 in both libraries would not fit this 24 GB machine next to each other). Batch 2 at 32x32
latents is one guided step of a 256x256 image. Repetitions are interleaved and the fastest of each is reported,
with the load average, as benchmarks/bench_unet.py does.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import jax
import numpy as np

from benchmarks.bench_unet import interleaved_min
from benchmarks.common import print_table
from sdjax.platform import configure_cpu

CONFIG = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "published" / "sdxl_base" / "unet" / "config.json"


def sdxl_config(width: float) -> dict:
    """The published SDXL base UNet config with block widths scaled by ``width`` (heads kept: narrower heads)."""
    config = json.loads(CONFIG.read_text())
    config["block_out_channels"] = [int(c * width) for c in config["block_out_channels"]]
    return config


def main() -> None:
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet

    from sdjax import weights
    from sdjax.models.unet import UNet2DConditionConfig, UNet2DConditionModel

    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--width", type=float, default=0.5)
    args = parser.parse_args()

    config = sdxl_config(args.width)
    torch.manual_seed(0)
    torch_unet = TorchUNet.from_config(config).eval()
    state = {k: v.numpy() for k, v in torch_unet.state_dict().items()}
    unet = UNet2DConditionModel(UNet2DConditionConfig.from_dict(config))
    params = jax.device_put(weights.torch_to_flax(state, weights.param_shapes(unet)))
    n_params = sum(v.size for v in state.values())

    rng = np.random.default_rng(0)
    b, s = args.batch, args.latent
    x = rng.standard_normal((b, s, s, 4)).astype(np.float32)
    context = rng.standard_normal((b, 77, config["cross_attention_dim"])).astype(np.float32)
    pooled = rng.standard_normal((b, 1280)).astype(np.float32)
    time_ids = np.tile(np.asarray([[1024, 1024, 0, 0, 1024, 1024]], np.float32), (b, 1))
    t = np.full((b,), 500, np.int32)

    def call(p, x, t, c, e, ids):
        return unet.apply({"params": p}, x, t, c, text_embeds=e, time_ids=ids)

    start = time.perf_counter()
    compiled = jax.jit(call).lower(params, x, t, context, pooled, time_ids).compile()
    compile_s = time.perf_counter() - start

    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    added = {"text_embeds": torch.from_numpy(pooled), "time_ids": torch.from_numpy(time_ids)}
    ct, tt = torch.from_numpy(context), torch.from_numpy(t)
    with torch.no_grad():
        times = interleaved_min(
            {
                "sdjax": lambda: jax.block_until_ready(compiled(params, x, t, context, pooled, time_ids)),
                "diffusers": lambda: torch_unet(xt, tt, ct, added_cond_kwargs=added),
            },
            args.repeats,
        )
        expected = torch_unet(xt, tt, ct, added_cond_kwargs=added).sample.numpy().transpose(0, 2, 3, 1)
    out = np.asarray(compiled(params, x, t, context, pooled, time_ids))
    rel = float(np.abs(out - expected).max() / np.abs(expected).max())
    rows = [
        ("parameters", f"{n_params / 1e6:.0f} M"),
        ("float32: diffusers (PyTorch) s/eval", f"{times['diffusers']:.3f}"),
        ("float32: sdjax s/eval", f"{times['sdjax']:.3f}"),
        ("float32: speed ratio (diffusers time / sdjax time)", f"{times['diffusers'] / times['sdjax']:.2f}x"),
        ("float32: sdjax compile s", f"{compile_s:.1f}"),
        ("float32: max rel diff sdjax vs diffusers", f"{rel:.1e}"),
        ("load average (1 min) after", f"{os.getloadavg()[0]:.2f}"),
    ]
    print_table(
        f"SDXL base UNet layout at {args.width:g}x width, batch {b}, {s}x{s} latents, CPU "
        f"({torch.get_num_threads()} torch threads), fastest of {args.repeats} interleaved",
        rows,
    )


if __name__ == "__main__":
    configure_cpu()
    main()
