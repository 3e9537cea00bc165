r"""Export a trained model (an sdjax training workdir's EMA weights) as a diffusers Stable Diffusion folder, or a
LoRA run's factors as LoRA files.

    python -m sdjax.export workdirs/shapes64 sdjax/shapes64/model --dtype float16
    python -m sdjax.export workdirs/sks_dog loras/sks_dog --lora

The folder loads with `sdjax.StableDiffusion.from_pretrained` and with diffusers' `StableDiffusionPipeline`.
With --lora (a workdir of the "lora" stage) the folder holds `pytorch_lora_weights.safetensors` (diffusers / PEFT,
as `save_lora_weights` writes it) and `kohya_lora.safetensors` (kohya / A1111), for `load_lora_weights` on the base
model in sdjax or diffusers (sdjax/loading/lora_export.py).
It is written next to the destination first and renamed into place, so a failed export leaves no half-written
folder behind.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path


def export(source: str | Path, destination: str | Path, dtype: str = "float32", *, overwrite: bool = False) -> Path:
    """Loads ``source`` (workdir, diffusers folder or single file) and writes it to ``destination`` with weights
    stored as ``dtype`` ("float32" or "float16"). Returns the destination path."""
    from sdjax.pipeline import StableDiffusion

    destination = Path(destination)
    check_destination(source, destination, overwrite)
    pipe = StableDiffusion.from_pretrained(source)
    return _replace_folder(destination, lambda staging: pipe.save_pretrained(staging, dtype=dtype))


def export_lora(
    workdir: str | Path, destination: str | Path, dtype: str = "float32", *, overwrite: bool = False
) -> Path:
    """Writes the LoRA of a "lora"-stage ``workdir`` (its latest checkpoint; EMA factors when kept) to the folder
    ``destination``: pytorch_lora_weights.safetensors (diffusers / PEFT) and kohya_lora.safetensors (kohya)."""
    from sdjax.loading import lora_export

    destination = Path(destination)
    check_destination(workdir, destination, overwrite, LORA_FOLDER_ENTRIES)
    lora_export.read_workdir_lora(workdir)  # one clear line for a workdir of another stage, before any writing
    return _replace_folder(destination, lambda staging: lora_export.write_lora_files(workdir, staging, dtype))


def _replace_folder(destination: Path, write: Callable[[Path], None]) -> Path:
    """Runs ``write(staging)`` on a new folder beside ``destination`` and renames it to ``destination`` (an old
    one there is set aside until the new one is in place): all or nothing."""
    from sdjax import weights

    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    old = destination.with_name(f".{destination.name}.replaced")
    try:
        write(staging)
        weights.follow_umask(staging)  # mkdtemp makes the folder 0700
        if destination.exists():  # the old folder is set aside until the new one is in place
            destination.rename(old)
        staging.rename(destination)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if old.exists() and not destination.exists():
            old.rename(destination)
    return destination


# What a diffusers / sdjax model folder holds; --overwrite replaces only a folder made of these.
MODEL_FOLDER_ENTRIES = frozenset(
    {
        "model_index.json",
        "unet",
        "vae",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
        "scheduler",
        "safety_checker",
        "feature_extractor",
        "image_encoder",
        "README.md",
        ".gitattributes",
    }
)
# What a LoRA export folder holds; --lora --overwrite replaces only a folder made of these.
LORA_FOLDER_ENTRIES = frozenset({"pytorch_lora_weights.safetensors", "kohya_lora.safetensors", "README.md"})


def check_destination(
    source: str | Path, destination: Path, overwrite: bool, entries_allowed: frozenset = MODEL_FOLDER_ENTRIES
) -> None:
    """Raises PipelineError unless writing ``destination`` can only replace a model folder sdjax recognises
    (a LoRA folder with ``LORA_FOLDER_ENTRIES``): never ``.``, the source, a folder holding the source, a file,
    or a folder with other files in it."""
    from sdjax.pipeline import PipelineError

    dest, src = destination.resolve(), Path(source).resolve()
    if dest == Path.cwd().resolve() or dest == src or dest in src.parents:
        raise PipelineError(
            f"destination {destination} is the current folder, the source or a folder holding the source; "
            "export into a new folder"
        )
    if not destination.exists() and not destination.is_symlink():
        return
    if not overwrite:
        raise PipelineError(f"{destination} exists; pass overwrite=True (--overwrite) to replace it")
    if not destination.is_dir() or destination.is_symlink():
        raise PipelineError(f"{destination} exists and is not a folder; --overwrite replaces only model folders")
    entries = {p.name for p in destination.iterdir()}
    foreign = sorted(entries - entries_allowed)
    if entries_allowed is LORA_FOLDER_ENTRIES:
        if foreign:
            raise PipelineError(
                f"{destination} is not a LoRA export folder ({', '.join(foreign[:5])}); --lora --overwrite replaces "
                "only a folder holding pytorch_lora_weights.safetensors and kohya_lora.safetensors"
            )
        return
    if foreign or (entries and "model_index.json" not in entries):
        listed = ", ".join(foreign[:5]) or "no model_index.json"
        raise PipelineError(
            f"{destination} is not a diffusers model folder ({listed}); --overwrite replaces only a folder "
            "holding model_index.json and component folders"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="sdjax training workdir, diffusers folder or single-file .safetensors")
    parser.add_argument("destination", help="folder to write")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16"), help="stored weight dtype")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    parser.add_argument(
        "--lora", action="store_true", help="source is a LoRA workdir: write its diffusers/PEFT and kohya LoRA files"
    )
    parser.add_argument("--no-compile-cache", action="store_true", help="skip JAX's persistent compilation cache")
    args = parser.parse_args(argv)
    if not args.no_compile_cache:
        from sdjax.compile_cache import enable_compile_cache

        enable_compile_cache()
    try:
        write = export_lora if args.lora else export
        path = write(args.source, args.destination, args.dtype, overwrite=args.overwrite)
    except ValueError as e:  # sdjax's errors say what is wrong and what is accepted
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(f"wrote {path} ({size / 1e6:.1f} MB, weights {args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
