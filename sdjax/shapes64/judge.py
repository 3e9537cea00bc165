"""A deterministic judge of shapes64-style images: which colour, shape and background does an image show?

It scores a trained shapes64 model: generate an image for a caption, judge it, compare with
`parse_caption(caption)`. Pure numpy (no TensorFlow) and no learnt weights, so the check itself cannot drift:

1. background: the palette colour most border pixels are nearest to;
2. foreground: pixels far from the background colour; their median colour, nearest palette colour;
3. shape: the foreground mask is compared (IoU) with an ideal ellipse, rectangle and apex-up triangle
   filling the mask's bounding box; the best match wins.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from sdjax.shapes64 import prompts
from sdjax.shapes64.scene import COLORS, PALETTE, SHAPES

_PALETTE_RGB = np.asarray([PALETTE[c] for c in COLORS], np.float32)
# A pixel is "maybe foreground" when this far (RGB euclidean, 0-255) from the background colour: at
# least 40 (~4 sigma of per-channel noise sigma=10), more on noisier backgrounds, always well under the
# smallest distance between two palette colours (~160).
_MIN_FOREGROUND_DISTANCE, _MAX_FOREGROUND_DISTANCE = 40.0, 80.0
# Fewer foreground pixels than this fraction of the image means "no shape drawn".
_MIN_FOREGROUND_FRACTION = 0.01
_CAPTION = re.compile(r"^\s*an?\s+(\w+)\s+(\w+)\s+on\s+an?\s+(\w+)\s+background\s*\.?\s*$", re.IGNORECASE)


class JudgeError(ValueError):
    """An image or caption the judge cannot read."""


def _as_rgb255(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or min(image.shape[:2]) < 8:
        raise JudgeError(f"expected an RGB image (H, W, 3) with H, W >= 8, got shape {image.shape}")
    if image.dtype == np.uint8:
        return image.astype(np.float32)
    if not np.issubdtype(image.dtype, np.floating):
        raise JudgeError(f"expected uint8 in [0, 255] or float in [0, 1], got dtype {image.dtype}")
    if not (np.isfinite(image).all() and image.min() >= -1e-3 and image.max() <= 1 + 1e-3):
        raise JudgeError(
            f"float images must lie in [0, 1], got range [{image.min()}, {image.max()}]; "
            "convert [-1, 1] or [0, 255] images first"
        )
    return np.clip(image.astype(np.float32), 0, 1) * 255


def _nearest_palette(rgb: np.ndarray, exclude: int | None = None) -> np.ndarray:
    distances = np.linalg.norm(rgb[..., None, :] - _PALETTE_RGB, axis=-1)
    if exclude is not None:
        distances[..., exclude] = np.inf
    return np.argmin(distances, axis=-1)


def _border(pixels: np.ndarray) -> np.ndarray:
    width = max(1, min(pixels.shape[:2]) // 32)
    inner = np.zeros(pixels.shape[:2], bool)
    inner[width:-width, width:-width] = True
    return pixels[~inner]


def _background(pixels: np.ndarray) -> tuple[int, np.ndarray, float]:
    border = _border(pixels)
    labels = _nearest_palette(border)
    index = int(np.argmax(np.bincount(labels, minlength=len(COLORS))))
    # The measured colour (not the palette entry) so a model's slightly-off background is still removed.
    background = border[labels == index]
    rgb = np.median(background, axis=0)
    noise = np.median(np.linalg.norm(background - rgb, axis=-1))
    return index, rgb, float(np.clip(3 * noise, _MIN_FOREGROUND_DISTANCE, _MAX_FOREGROUND_DISTANCE))


def _drop_isolated(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    neighbours = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    return mask & neighbours


def _shape_templates(height: int, width: int, box: tuple[int, int, int, int]) -> dict[str, np.ndarray]:
    y0, y1, x0, x1 = box
    v = (np.arange(height)[:, None] + 0.5 - (y0 + y1) / 2) / ((y1 - y0) / 2)
    u = (np.arange(width)[None, :] + 0.5 - (x0 + x1) / 2) / ((x1 - x0) / 2)
    in_box = (np.abs(u) <= 1) & (np.abs(v) <= 1)
    return {
        "circle": u**2 + v**2 <= 1,
        "square": in_box,
        "triangle": in_box & (np.abs(u) <= (v + 1) / 2),
    }


def _classify_shape(mask: np.ndarray) -> str:
    rows, cols = np.nonzero(mask)
    box = (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1)
    templates = _shape_templates(*mask.shape, box)
    iou = {name: (mask & t).sum() / (mask | t).sum() for name, t in templates.items()}
    return max(SHAPES, key=iou.__getitem__)


def judge(image: np.ndarray) -> dict[str, str | None]:
    """Reads colour, shape and background off an image of one shape on a plain background.

    Args:
      image: (H, W, 3) RGB, uint8 in [0, 255] or float in [0, 1]; any H, W >= 8 (shapes64 is 64x64).
    Returns:
      {"color": palette name or None, "shape": "circle" | "square" | "triangle" or None,
       "background": palette name}; color and shape are None when no foreground is visible.
    """
    pixels = _as_rgb255(image)
    bg_index, bg_rgb, threshold = _background(pixels)
    result = {"color": None, "shape": None, "background": COLORS[bg_index]}
    candidates = np.linalg.norm(pixels - bg_rgb, axis=-1) > threshold
    min_pixels = _MIN_FOREGROUND_FRACTION * candidates.size
    if candidates.sum() < min_pixels:
        return result
    fg_rgb = np.median(pixels[candidates], axis=0)
    result["color"] = COLORS[int(_nearest_palette(fg_rgb, exclude=bg_index))]
    # Half-way between background and foreground colour: anti-aliased or blurred edges split evenly.
    axis = fg_rgb - bg_rgb
    mask = _drop_isolated((pixels - bg_rgb) @ axis > 0.5 * (axis @ axis))
    if mask.sum() >= min_pixels:
        result["shape"] = _classify_shape(mask)
    return result


def parse_caption(caption: str) -> dict[str, str]:
    """{"color", "shape", "background"} of a caption "a {color} {shape} on a {background} background"."""
    match = _CAPTION.match(caption)
    if match is None:
        raise JudgeError(
            f"caption {caption!r} is not of the form 'a {{color}} {{shape}} on a {{background}} background'"
        )
    color, shape, background = (word.lower() for word in match.groups())
    if color not in PALETTE or background not in PALETTE or shape not in SHAPES:
        raise JudgeError(
            f"caption {caption!r} names an unknown colour or shape; colours: {', '.join(COLORS)}; "
            f"shapes: {', '.join(SHAPES)}"
        )
    return {"color": color, "shape": shape, "background": background}


def accuracy(images: np.ndarray, captions: list[str]) -> dict[str, float]:
    """Fraction of images whose judged color / shape / background (and "all" three) match their caption.

    images: (N, H, W, 3) uint8 or float [0, 1]; captions: N shapes64 captions.
    """
    if len(images) != len(captions):
        raise JudgeError(f"got {len(images)} images but {len(captions)} captions; they must pair up")
    hits = {"color": 0, "shape": 0, "background": 0, "all": 0}
    for image, text in zip(images, captions, strict=True):
        truth, seen = parse_caption(text), judge(image)
        matches = {key: seen[key] == truth[key] for key in truth}
        for key, ok in matches.items():
            hits[key] += ok
        hits["all"] += all(matches.values())
    return {key: count / max(1, len(captions)) for key, count in hits.items()}


def eval_prompts() -> list[str]:
    """The v1 bar's 30 prompts: :func:`sdjax.shapes64.prompts.tuning_prompts` (kept under this name)."""
    return prompts.tuning_prompts()


def evaluate(
    pipe: Any, prompts: list[str] | None = None, num_images_per_prompt: int = 4, **generate_kwargs: Any
) -> tuple[dict[str, float], np.ndarray]:
    """Generates ``num_images_per_prompt`` images per prompt with ``pipe.generate`` (its defaults: 50 DDIM steps,
    guidance 7.5, seed 0, unless ``generate_kwargs`` say otherwise) and judges them.

    Returns (accuracy dict as :func:`accuracy`, images (N, H, W, 3) uint8 with N = len(prompts) *
    num_images_per_prompt, prompt-major)."""
    prompts = eval_prompts() if prompts is None else list(prompts)
    images = pipe.generate(prompts, num_images_per_prompt=num_images_per_prompt, **generate_kwargs)
    captions = [p for p in prompts for _ in range(num_images_per_prompt)]
    return accuracy(images, captions), images


def main(argv: list[str] | None = None) -> int:
    """``python -m sdjax.shapes64.judge [MODEL] [--num-images N] [--steps S] [--guidance G] [--grid PNG]``: scores a
    shapes64 model on :func:`eval_prompts` and prints the accuracy table."""
    import argparse
    import time
    from pathlib import Path

    parser = argparse.ArgumentParser(description="Score a shapes64 text-to-image model with the shapes judge.")
    parser.add_argument("model", nargs="?", default=str(Path(__file__).resolve().parent / "model"))
    parser.add_argument("--num-images", type=int, default=4, help="images per prompt")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", default=None, help="also save the images as one PNG grid (a row per prompt)")
    parser.add_argument("--no-compile-cache", action="store_true", help="skip JAX's persistent compilation cache")
    args = parser.parse_args(argv)
    if not args.no_compile_cache:
        from sdjax.compile_cache import enable_compile_cache

        enable_compile_cache()

    from sdjax.images import image_grid, save_png
    from sdjax.pipeline import StableDiffusion

    start = time.perf_counter()
    pipe = StableDiffusion.from_pretrained(args.model)
    scores, images = evaluate(
        pipe,
        num_images_per_prompt=args.num_images,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        sampler=args.sampler,
        seed=args.seed,
    )
    print(
        f"{len(images)} images ({len(eval_prompts())} prompts x {args.num_images}), {args.steps} {args.sampler} "
        f"steps, guidance {args.guidance}, seed {args.seed}: {time.perf_counter() - start:.1f} s"
    )
    print("| colour | shape | background | all three |\n|---|---|---|---|")
    print("| " + " | ".join(f"{100 * scores[k]:.1f}%" for k in ("color", "shape", "background", "all")) + " |")
    if args.grid:
        save_png(image_grid(images, cols=args.num_images), Path(args.grid))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
