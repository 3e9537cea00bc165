"""Loading an SD 1.5-sized pipeline (UNet + VAE + text encoder, random weights): sdjax vs diffusers, same files.

    python -m benchmarks.bench_load [--folder DIR] [--repeats 3] [--dtype float32|bfloat16]

Without ``--folder`` a diffusers folder (about 4.3 GB of float32 safetensors) and the same weights as one
single-file (LDM-named) checkpoint are written to a temporary folder first. Then, interleaved, each fastest of
``--repeats``: diffusers ``StableDiffusionPipeline.from_pretrained(folder)`` (alone, and followed by a first
read of every weight, which its lazily mapped tensors defer to the first denoising step),
``sdjax.StableDiffusion.from_pretrained`` on the folder and on the single file. All in this one process, so the
files are in the page cache for every load alike (the first, cold read is a warm-up and not counted). Prints a
Markdown table with the load average.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

from benchmarks.bench_unet import interleaved_min
from benchmarks.common import print_table
from sdjax.platform import configure_cpu


def write_single_file(folder: Path, file: Path) -> None:
    """The folder's UNet, VAE and text encoder as one LDM-named float32 ``.safetensors`` (as A1111 reads)."""
    from safetensors.numpy import save_file

    from sdjax import weights
    from sdjax.loading import ldm_names

    components = {
        name: weights.read_safetensors(weights.find_weight_files(folder / name, library))
        for name, library in (("unet", "diffusers"), ("vae", "diffusers"), ("text_encoder", "transformers"))
    }
    save_file({k: v.copy() for k, v in ldm_names.diffusers_to_ldm(components).items()}, str(file))


def touch_weights(pipe) -> None:
    """Reads one byte of every 4 KiB page of every diffusers weight: what the first denoising step does to a
    pipeline whose tensors are still the memory-mapped file's untouched pages (page faults, no arithmetic)."""
    import torch

    for model in (pipe.unet, pipe.vae, pipe.text_encoder):
        for tensor in model.state_dict().values():
            flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
            int(flat[::4096].sum())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--folder", help="an SD 1.x diffusers folder (default: random SD 1.5 weights, written here)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args()
    import diffusers
    import torch

    import sdjax

    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/tmp")) as tmp:
        folder = Path(args.folder) if args.folder else Path(tmp) / "sd15"
        if not args.folder:
            from benchmarks.bench_sample import build_reference

            build_reference(folder)
        single = Path(tmp) / "sd15.safetensors"
        write_single_file(folder, single)
        size_gb = sum(f.stat().st_size for f in folder.rglob("*.safetensors")) / 1e9
        dtype = jnp.dtype(args.dtype)
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]

        def load(fn, touch=False):
            def run():
                pipe = fn()
                if hasattr(pipe, "params"):
                    jax.block_until_ready(pipe.params)
                if touch:
                    touch_weights(pipe)
                del pipe
                gc.collect()

            return run

        def diffusers_load():
            return diffusers.StableDiffusionPipeline.from_pretrained(
                folder, torch_dtype=torch_dtype, safety_checker=None, requires_safety_checker=False
            )

        times = interleaved_min(
            {
                "diffusers folder": load(diffusers_load),
                "diffusers folder, weights read": load(diffusers_load, touch=True),
                "sdjax folder": load(lambda: sdjax.StableDiffusion.from_pretrained(folder, dtype=dtype)),
                "sdjax single file": load(
                    lambda: sdjax.StableDiffusion.from_pretrained(
                        single, dtype=dtype, tokenizer_path=folder / "tokenizer"
                    )
                ),
            },
            args.repeats,
        )
    d = times["diffusers folder"]
    print_table(
        f"Load SD 1.5-sized pipeline (UNet + VAE + text encoder, {size_gb:.1f} GB float32 safetensors) as "
        f"{args.dtype}, page cache warm, fastest of {args.repeats} interleaved, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.2f}",
        [
            ("diffusers from_pretrained(folder) s", f"{d:.2f}"),
            (
                "diffusers from_pretrained(folder) + first read of every weight s",
                f"{times['diffusers folder, weights read']:.2f}",
            ),
            ("sdjax from_pretrained(folder) s", f"{times['sdjax folder']:.2f} ({d / times['sdjax folder']:.2f}x)"),
            (
                "sdjax from_pretrained(single file) s",
                f"{times['sdjax single file']:.2f} ({d / times['sdjax single file']:.2f}x)",
            ),
        ],
    )


if __name__ == "__main__":
    configure_cpu()
    main()
