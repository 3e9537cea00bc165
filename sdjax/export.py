r"""Export a trained model (an sdjax training workdir's EMA weights) as a diffusers Stable Diffusion folder.

    python -m sdjax.export workdirs/shapes64 models/shapes64 --dtype float16

The folder loads with `sdjax.StableDiffusion.from_pretrained` and with diffusers' `StableDiffusionPipeline`.
It is written next to the destination first and renamed into place, so a failed export leaves no half-written
folder behind.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path


def export(source: str | Path, destination: str | Path, dtype: str = "float32", *, overwrite: bool = False) -> Path:
    """Loads ``source`` (workdir, diffusers folder or single file) and writes it to ``destination`` with weights
    stored as ``dtype`` ("float32" or "float16"). Returns the destination path."""
    from sdjax.pipeline import PipelineError, StableDiffusion

    destination = Path(destination)
    if destination.exists() and not overwrite:
        raise PipelineError(f"{destination} exists; pass overwrite=True (--overwrite) to replace it")
    pipe = StableDiffusion.from_pretrained(source)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        pipe.save_pretrained(staging, dtype=dtype)
        if destination.exists():
            shutil.rmtree(destination)
        staging.rename(destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return destination


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="sdjax training workdir, diffusers folder or single-file .safetensors")
    parser.add_argument("destination", help="folder to write")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16"), help="stored weight dtype")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    parser.add_argument("--no-compile-cache", action="store_true", help="skip JAX's persistent compilation cache")
    args = parser.parse_args(argv)
    if not args.no_compile_cache:
        from sdjax.compile_cache import enable_compile_cache

        enable_compile_cache()
    try:
        path = export(args.source, args.destination, args.dtype, overwrite=args.overwrite)
    except ValueError as e:  # sdjax's errors say what is wrong and what is accepted
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(f"wrote {path} ({size / 1e6:.1f} MB, weights {args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
