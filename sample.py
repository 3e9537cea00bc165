"""Generate images from text with sdjax.

    python sample.py --prompt "a red circle on a blue background" --out out/
    python sample.py --model path/to/stable-diffusion-v1-5 --prompt "an astronaut riding a horse" \\
        --negative-prompt "blurry" --num-images 4 --steps 50 --guidance 7.5 --sampler dpmpp_2m --out out/
    python sample.py --model DIR --prompt "..." --init-image photo.png --strength 0.6 --out out/

--model takes a diffusers folder, an sdjax training workdir or a single-file .safetensors checkpoint (it gets the
built-in CLIP tokenizer, or --tokenizer DIR; --prediction-type v_prediction for SD 2.x 768-v); without it,
models/shapes64.
Writes one PNG per image (prompt, negative prompt, seed, sampler, steps and guidance in its text metadata) and
grid.png, and prints the compile time and the time per image.
"""

from __future__ import annotations

import time

START = time.perf_counter()  # before the heavy imports: the printed breakdown counts them

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

# sdjax needs only transformers' tokenizer: silence its "PyTorch was not found" advice in this CLI.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

DEFAULT_MODEL = Path(__file__).resolve().parent / "models" / "shapes64"


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from sdjax.samplers import SAMPLERS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    parser.add_argument("--negative-prompt", action="append", default=None, help="one for all, or one per prompt")
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt")
    parser.add_argument("--steps", type=int, default=50, help="sampler steps")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    parser.add_argument("--sampler", default="ddim", choices=SAMPLERS, help="sampler")
    parser.add_argument("--karras", action="store_true", help="Karras sigmas (euler, euler_ancestral, dpmpp_2m, heun)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    parser.add_argument("--seed", type=int, default=0, help="image i uses (seed, i)")
    parser.add_argument("--height", type=int, default=None, help="pixels (None: the model's sample size)")
    parser.add_argument("--width", type=int, default=None, help="pixels (None: the model's sample size)")
    parser.add_argument("--model", default=None, help=f"diffusers folder or sdjax workdir (default {DEFAULT_MODEL})")
    parser.add_argument("--tokenizer", default=None, help="CLIP tokenizer folder (default: built in)")
    parser.add_argument(
        "--prediction-type",
        default=None,
        choices=("epsilon", "v_prediction"),
        help="single-file checkpoints only: v_prediction for SD 2.x 768-v (not recorded in the weights)",
    )
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--init-image", default=None, help="image file for image-to-image")
    parser.add_argument("--strength", type=float, default=0.75, help="img2img: fraction of the schedule re-run")
    parser.add_argument("--progress", action="store_true", help="show a progress bar over the sampling steps")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--no-compile-cache",
        action="store_true",
        help="do not read or write JAX's persistent compilation cache ($SDJAX_CACHE_DIR, else ~/.cache/sdjax/jax)",
    )
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """ValueError (one line) for arguments that are wrong whatever the model: numbers, sizes, the init image,
    the output folder (created here if missing, so that a late failure to write cannot lose the images)."""
    from sdjax import pipeline

    pipeline.check_generate_args(args.guidance, args.eta, args.strength, args.seed, args.num_images)
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and not 0 < value <= pipeline.MAX_IMAGE_SIDE:
            raise ValueError(f"--{name} must be in [8, {pipeline.MAX_IMAGE_SIDE}] pixels, got {value}")
    if args.init_image is not None:
        pipeline.read_image(args.init_image)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".sdjax-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"--out {out} is not a writable folder: {e.strerror}") from e


def write_images(args: argparse.Namespace, model: Path, images: np.ndarray, negative: Any) -> Path:
    """Saves images (N, H, W, 3) in [0, 1] as out/NNNN.png with their settings as PNG text, and out/grid.png."""
    from sdjax.images import image_grid, save_png

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    negatives = negative if isinstance(negative, list) else [negative or ""] * len(args.prompt)
    for i, image in enumerate(images):
        p = i // args.num_images
        metadata = {
            "prompt": args.prompt[p],
            "negative_prompt": negatives[p],
            "seed": args.seed,
            "image_index": i,
            "sampler": args.sampler + (" (karras)" if args.karras else ""),
            "steps": args.steps,
            "guidance": args.guidance,
            "model": str(model),
        }
        if args.init_image:
            metadata.update(init_image=args.init_image, strength=args.strength)
        save_png(image, out / f"{i:04d}.png", metadata)
    save_png(image_grid(images, cols=args.num_images if len(args.prompt) > 1 else None), out / "grid.png")
    return out


def main(argv: list[str] | None = None) -> int:
    origin = START if argv is None else time.perf_counter()  # called as a script: count the imports too
    args = parse_args(argv)
    import sdjax

    if not args.no_compile_cache:
        sdjax.enable_compile_cache()
    import_s = time.perf_counter() - origin
    model = Path(args.model) if args.model else DEFAULT_MODEL
    try:  # everything that can be checked without the model, before the seconds of loading it
        check_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    negative = args.negative_prompt
    if negative is not None and len(negative) == 1:
        negative = negative[0]
    try:
        start = time.perf_counter()
        pipe = sdjax.StableDiffusion.from_pretrained(
            model, dtype=jnp.dtype(args.dtype), tokenizer_path=args.tokenizer, prediction_type=args.prediction_type
        )
        load_s = time.perf_counter() - start
        start = time.perf_counter()
        images = pipe.generate(
            args.prompt,
            negative_prompts=negative,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            sampler=args.sampler,
            seed=args.seed,
            height=args.height,
            width=args.width,
            eta=args.eta,
            num_images_per_prompt=args.num_images,
            init_image=args.init_image,
            strength=args.strength,
            use_karras_sigmas=args.karras or None,
            progress=args.progress,
        )
        generate_s = time.perf_counter() - start
    except ValueError as e:  # sdjax's own errors are ValueErrors with a message that says what is accepted
        print(f"error: {e}", file=sys.stderr)
        return 2

    start = time.perf_counter()
    out = write_images(args, model, images, negative)
    write_s = time.perf_counter() - start
    t = pipe.last_timings
    prepare_s = generate_s - t["compile_s"] - t["generate_s"]  # prompt encoding, planning, noise
    print(
        f"{len(images)} images {images.shape[2]}x{images.shape[1]} -> {out}/ | {t['generate_s'] / len(images):.2f} "
        f"s/image | import {import_s:.1f} s + load {load_s:.1f} s + prompts {prepare_s:.1f} s + compile "
        f"{t['compile_s']:.1f} s + sampling {t['generate_s']:.1f} s + writing {write_s:.1f} s = "
        f"{time.perf_counter() - origin:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
