"""Generate images from text with sdjax.

    python sample.py --prompt "a red circle on a blue background" --out out/
    python sample.py --model path/to/stable-diffusion-v1-5 --prompt "an astronaut riding a horse" \\
        --negative-prompt "blurry" --num-images 4 --steps 50 --guidance 7.5 --sampler dpmpp_2m --out out/
    python sample.py --model DIR --prompt "..." --init-image photo.png --strength 0.6 --out out/
    python sample.py --model DIR --prompt "..." --init-image photo.png --mask mask.png --out out/  # inpainting
    python sample.py --model DIR --prompt "..." --controlnet control_v11p_sd15_canny --control-image edges.png \\
        --control-scale 0.8 --out out/
    python sample.py --model stable-diffusion-xl-base-1.0 --refiner stable-diffusion-xl-refiner-1.0 \\
        --high-noise-frac 0.8 --prompt "an astronaut riding a horse" --steps 40 --dtype bfloat16 --out out/

--model takes a diffusers folder (SD 1.x / 2.x or SDXL), an sdjax training workdir or a single-file .safetensors
checkpoint (it gets the built-in CLIP tokenizer, or --tokenizer DIR; --prediction-type v_prediction for SD 2.x
768-v); without it, the shipped shapes64 model (sdjax/shapes64/model). --sampler and --guidance default to the
model's: its folder's generation_config.json, else SD's ddim and 7.5, SDXL's scheduler's sampler (euler) and 5.0.
With --refiner, the --model SDXL base runs the first --high-noise-frac of the schedule and the refiner the rest, on
the base's latents (diffusers' "ensemble of expert denoisers"). --mask (white = repaint) inpaints --init-image,
with an inpainting model or an ordinary one. --controlnet, --control-image and --control-scale are repeatable (one
image per ControlNet; one scale for all or one each); they combine with --init-image and --mask.
Writes one PNG per image (prompt, negative prompt, seed, sampler, steps and guidance in its text metadata) and
grid.png, and prints the compile time and the time per image.
"""

from __future__ import annotations

import time

START = time.perf_counter()  # before the heavy imports: the printed breakdown counts them

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, NoReturn  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from sdjax.shapes64 import MODEL_DIR as DEFAULT_MODEL  # noqa: E402


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and each option's default where it has one its help does not state."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if unset or "default" in help_text or action.required:
            return help_text
        return f"{help_text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line (status 2), not argparse's usage block: the line names the flag, --help lists them all."""
        self.exit(2, f"error: {message} (see --help)\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    """sample.py's options; errors are one line (status 2)."""
    from sdjax.samplers import SAMPLERS

    parser = _Parser(description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--prompt", action="append", required=True, help="text prompt; repeat for several prompts")
    parser.add_argument("--negative-prompt", action="append", default=None, help="one for all, or one per prompt")
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt")
    parser.add_argument("--steps", type=int, default=50, help="sampler steps")
    parser.add_argument("--prompt-2", action="append", default=None, help="SDXL: second text encoder's prompt(s)")
    parser.add_argument("--negative-prompt-2", action="append", default=None, help="SDXL: second encoder's negative")
    parser.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default: the model's)")
    parser.add_argument("--sampler", default=None, choices=SAMPLERS, help="sampler (default: the model's)")
    parser.add_argument("--refiner", default=None, help="SDXL refiner (folder or file) for the last denoising steps")
    parser.add_argument(
        "--high-noise-frac",
        type=float,
        default=None,
        help="with --refiner: the base's share (default: 0.8)",
    )
    parser.add_argument("--karras", action="store_true", help="Karras sigmas (samplers with sigmas, as diffusers)")
    parser.add_argument(
        "--scheduler-config",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="a scheduler config field for this run, over the model's (repeatable; VALUE is JSON or a string), "
        "e.g. timestep_spacing=trailing",
    )
    parser.add_argument("--eta", type=float, default=None, help="DDIM eta / TCD gamma, 0 = deterministic (default: 0)")
    parser.add_argument("--seed", type=int, default=0, help="image i uses (seed, i)")
    parser.add_argument("--height", type=int, default=None, help="pixels (default: the model's sample size)")
    parser.add_argument("--width", type=int, default=None, help="pixels (default: the model's sample size)")
    parser.add_argument(
        "--model", default=None, help=f"diffusers folder, sdjax workdir or .safetensors file (default: {DEFAULT_MODEL})"
    )
    parser.add_argument("--tokenizer", default=None, help="single files: tokenizer folder (default: built in)")
    parser.add_argument(
        "--prediction-type",
        default=None,
        choices=("epsilon", "v_prediction"),
        help="single-file checkpoints only: v_prediction for SD 2.x 768-v (not recorded in the weights)",
    )
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="params and compute dtype")
    _add_task_flags(parser)
    parser.add_argument("--progress", action="store_true", help="show a progress bar over the sampling steps")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--no-compile-cache",
        action="store_true",
        help="do not read or write JAX's persistent compilation cache ($SDJAX_CACHE_DIR, else ~/.cache/sdjax/jax)",
    )
    return parser


def _add_task_flags(parser: argparse.ArgumentParser) -> None:
    """img2img, inpainting and ControlNet options."""
    parser.add_argument("--init-image", default=None, help="image file for image-to-image")
    parser.add_argument(
        "--strength",
        type=float,
        default=None,
        help="with --init-image: share re-run (default: 0.75; with --mask 1.0, SDXL 0.3 / 0.9999)",
    )
    parser.add_argument("--mask", default=None, help="with --init-image: inpainting mask file, white = repaint")
    parser.add_argument("--controlnet", action="append", default=None, help="ControlNet folder or file (repeatable)")
    parser.add_argument(
        "--control-image", action="append", default=None, help="control image file, one per --controlnet"
    )
    parser.add_argument(
        "--control-scale", action="append", type=float, default=None, help="one, or one per --controlnet (default: 1.0)"
    )


# Options that only act in one mode, with the mode they need (checked before loading; the others after it).
_NEEDS = {
    "strength": ("--strength", "init_image", "image-to-image: pass --init-image FILE too"),
    "mask": ("--mask", "init_image", "inpainting the --init-image: pass --init-image FILE too"),
    "control_image": ("--control-image", "controlnet", "ControlNet guidance: pass --controlnet PATH too"),
    "control_scale": ("--control-scale", "controlnet", "ControlNet guidance: pass --controlnet PATH too"),
    "high_noise_frac": ("--high-noise-frac", "refiner", "the SDXL base -> refiner hand-off: pass --refiner PATH too"),
}
DEFAULTS = {"high_noise_frac": 0.8, "eta": 0.0}  # after the checks above (--strength: the model's)
FLAGS = {"guidance_scale": "--guidance", "eta": "--eta", "strength": "--strength", "seed": "--seed",
         "num_images_per_prompt": "--num-images"}  # fmt: skip


def check_args(args: argparse.Namespace) -> None:
    """ValueError (one line) for arguments that are wrong whatever the model: numbers, sizes, the init image,
    the output folder (created here if missing, so that a late failure to write cannot lose the images)."""
    from sdjax import pipeline

    for name, (flag, needed, mode) in _NEEDS.items():
        if getattr(args, name) is not None and getattr(args, needed) is None:
            raise ValueError(f"{flag} applies to {mode}")
    check_modes(args, args.sampler, args.guidance)
    for flag, texts in (("--prompt", args.prompt), ("--negative-prompt", args.negative_prompt),
                        ("--prompt-2", args.prompt_2), ("--negative-prompt-2", args.negative_prompt_2)):  # fmt: skip
        for text in texts or ():
            pipeline.check_text(flag, text)
    for name, default in DEFAULTS.items():
        setattr(args, name, default if getattr(args, name) is None else getattr(args, name))
    guidance = 1.0 if args.guidance is None else args.guidance
    strength = 1.0 if args.strength is None else args.strength
    pipeline.check_generate_args(guidance, args.eta, strength, args.seed, args.num_images, FLAGS)
    check_task_files(args)
    if args.refiner is not None and not 0 < args.high_noise_frac < 1:
        raise ValueError(f"--high-noise-frac must be a finite number in (0, 1), got {args.high_noise_frac}")
    if (args.tokenizer or args.prediction_type) and Path(args.model or DEFAULT_MODEL).is_dir():
        flag = "--tokenizer" if args.tokenizer else "--prediction-type"
        raise ValueError(f"{flag} applies to single-file .safetensors checkpoints; a folder --model has its own")
    if args.refiner is not None and args.init_image is not None:
        raise ValueError("--refiner continues a text-to-image run; it does not take --init-image")
    args.scheduler_config = scheduler_config(args.scheduler_config)
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and not 0 < value <= pipeline.MAX_IMAGE_SIDE:
            raise ValueError(f"--{name} must be in [1, {pipeline.MAX_IMAGE_SIDE}] pixels, got {value}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    args.created_out = not out.exists()  # a later error removes it again (when still empty): nothing left behind
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".sdjax-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"--out {out} is not a writable folder: {e.strerror}") from e


def check_task_files(args: argparse.Namespace) -> None:
    """ValueError (one line) for unreadable image files and --controlnet / --control-image / --control-scale
    counts that differ."""
    from sdjax.images import read_image

    if args.refiner is not None and (args.mask or args.controlnet):
        raise ValueError("--refiner continues a text-to-image run; it does not take --mask or --controlnet")
    nets, images, scales = (len(getattr(args, name) or ()) for name in ("controlnet", "control_image", "control_scale"))
    if nets != images:
        raise ValueError(f"got {images} --control-image for {nets} --controlnet; pass one image per ControlNet")
    if scales not in (0, 1, nets):
        raise ValueError(f"got {scales} --control-scale for {nets} --controlnet; pass one, or one per ControlNet")
    for what, path in [("init image", args.init_image), ("mask image", args.mask),
                       *(("control image", p) for p in args.control_image or ())]:  # fmt: skip
        if path is not None:
            read_image(path, what)


def scheduler_config(pairs: list[str] | None) -> dict[str, Any] | None:
    """--scheduler-config KEY=VALUE flags -> {key: value}, VALUE read as JSON (true, 3, null) or else a string."""
    if not pairs:
        return None
    config = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--scheduler-config takes KEY=VALUE (e.g. timestep_spacing=trailing), got {pair!r}")
        try:
            config[key] = json.loads(value)
        except json.JSONDecodeError:
            config[key] = value
    return config


def write_images(args: argparse.Namespace, model: Path, images: np.ndarray, negative: Any, settings: dict) -> Path:
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
            "sampler": settings["sampler"] + (" (karras)" if args.karras else ""),
            "steps": args.steps,
            "guidance": settings["guidance_scale"],
            "model": str(model),
        }
        if args.refiner:
            metadata.update(refiner=args.refiner, high_noise_frac=args.high_noise_frac)
        if args.init_image:
            metadata.update(init_image=args.init_image, strength=args.strength or "default")
        if args.mask:
            metadata.update(mask=args.mask)
        if args.controlnet:
            metadata.update(controlnet=json.dumps(args.controlnet), control_image=json.dumps(args.control_image),
                            control_scale=json.dumps(args.control_scale or [1.0]))  # fmt: skip
        if args.scheduler_config:
            metadata.update(scheduler_config=json.dumps(args.scheduler_config))
        save_png(image, out / f"{i:04d}.png", metadata)
    save_png(image_grid(images, cols=args.num_images if len(args.prompt) > 1 else None), out / "grid.png")
    return out


def _one_or_list(values: list[str] | None) -> str | list[str] | None:
    return values[0] if values is not None and len(values) == 1 else values


def load_models(args: argparse.Namespace, model: Path) -> tuple[Any, Any]:
    """The pipeline of --model (StableDiffusion or StableDiffusionXL) and the --refiner's (or None)."""
    import sdjax

    dtype = jnp.dtype(args.dtype)
    options = {"tokenizer_path": args.tokenizer, "prediction_type": args.prediction_type}
    pipe = sdjax.from_pretrained(model, dtype, **{k: v for k, v in options.items() if v is not None})
    xl_only = {"--prompt-2": args.prompt_2, "--negative-prompt-2": args.negative_prompt_2, "--refiner": args.refiner}
    given = [flag for flag, value in xl_only.items() if value is not None]
    if given and pipe.family != "sdxl":
        verb = "applies" if len(given) == 1 else "apply"
        raise ValueError(f"{', '.join(given)} {verb} to SDXL models; {model} is Stable Diffusion 1.x / 2.x")
    if args.controlnet:
        args.controlnets = [sdjax.ControlNet.from_pretrained(path, dtype) for path in args.controlnet]
    if args.refiner is None:
        return pipe, None
    return pipe, sdjax.StableDiffusionXL.from_pretrained(args.refiner, dtype)


def _settings(args: argparse.Namespace, pipe: Any) -> dict[str, Any]:
    """The sampler and guidance scale: the flags, else the model family's defaults."""
    sampler, guidance = pipe.sampling_settings(args.sampler or None, args.guidance)
    check_modes(args, sampler, guidance)
    return {"sampler": sampler, "guidance_scale": guidance}


def check_modes(args: argparse.Namespace, sampler: str | None, guidance: float | None) -> None:
    """ValueError for an option that this run's sampler or guidance would ignore (None: not known yet)."""
    from sdjax.samplers import REGISTRY

    eta_samplers = [name for name, record in REGISTRY.items() if record.noise == "eta"]  # whose step reads eta
    if args.eta and sampler is not None and sampler not in eta_samplers:
        raise ValueError(f"--eta applies to --sampler {' or '.join(eta_samplers)}; this run's sampler is {sampler}")
    given = {"--negative-prompt": args.negative_prompt, "--negative-prompt-2": args.negative_prompt_2}
    negatives = [flag for flag, value in given.items() if value]
    if negatives and guidance is not None and guidance <= 1:
        verb = "needs" if len(negatives) == 1 else "need"
        raise ValueError(f"{' and '.join(negatives)} {verb} classifier-free guidance, --guidance > 1; it is {guidance}")


def generate(args: argparse.Namespace, pipe: Any, refiner: Any, negative: Any, settings: dict) -> np.ndarray:
    """Runs --model (and, with --refiner, the hand-off); float32 images (N, H, W, 3) in [0, 1]."""
    common = dict(
        negative_prompts=negative,
        num_inference_steps=args.steps,
        seed=args.seed,
        eta=args.eta,
        num_images_per_prompt=args.num_images,
        use_karras_sigmas=args.karras or None,
        scheduler_config=args.scheduler_config,
        progress=args.progress,
        **settings,
    )
    if pipe.family == "sdxl":
        common.update(prompts_2=_one_or_list(args.prompt_2), negative_prompts_2=_one_or_list(args.negative_prompt_2))
    if refiner is None:
        tasks = dict(init_image=args.init_image, strength=args.strength, mask_image=args.mask)
        if args.controlnet:
            scales = args.control_scale or [1.0]
            tasks.update(controlnet=args.controlnets, control_image=args.control_image,
                         controlnet_conditioning_scale=scales if len(scales) > 1 else scales[0])  # fmt: skip
        return pipe.generate(args.prompt, height=args.height, width=args.width, **common, **tasks)
    latents = pipe.generate(
        args.prompt, height=args.height, width=args.width, denoising_end=args.high_noise_frac, output="latent",
        **common,
    )  # fmt: skip
    common["num_images_per_prompt"] = 1
    common["negative_prompts"] = _repeat(negative, args.num_images)
    for key in ("prompts_2", "negative_prompts_2"):
        common[key] = _repeat(common[key], args.num_images)
    prompts = _repeat(args.prompt, args.num_images)
    return refiner.generate(prompts, denoising_start=args.high_noise_frac, init_image=latents, **common)


def _repeat(values: Any, times: int) -> Any:
    """A prompt list repeated per image (the refiner gets one prompt per latent); a string or None as it is."""
    return values if values is None or isinstance(values, str) else [v for v in values for _ in range(times)]


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
    negative = _one_or_list(args.negative_prompt)
    try:
        start = time.perf_counter()
        pipe, refiner = load_models(args, model)
        load_s = time.perf_counter() - start
        start = time.perf_counter()
        settings = _settings(args, pipe)
        images = generate(args, pipe, refiner, negative, settings)
        generate_s = time.perf_counter() - start
    except ValueError as e:  # sdjax's own errors are ValueErrors with a message that says what is accepted
        print(f"error: {e}", file=sys.stderr)
        if args.created_out and not any(Path(args.out).iterdir()):
            Path(args.out).rmdir()
        return 2

    start = time.perf_counter()
    out = write_images(args, model, images, negative, settings)
    write_s = time.perf_counter() - start
    t = {k: pipe.last_timings[k] + (refiner.last_timings[k] if refiner else 0.0) for k in ("compile_s", "generate_s")}
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
