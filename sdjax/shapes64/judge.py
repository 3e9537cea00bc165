"""Deterministic judges of shapes64-style images: which colour, shape and background does an image show, and how
crisp is its shape?

They score a trained shapes64 model: generate an image for a caption, judge it, compare with
`parse_caption(caption)`. Pure numpy (no TensorFlow) and no learnt weights, so the check itself cannot drift.

`judge` (lenient, issue 5):
1. background: the palette colour most border pixels are nearest to;
2. foreground: pixels far from the background colour; their median colour, nearest palette colour;
3. shape: the foreground mask is compared (IoU) with an ideal ellipse, rectangle and apex-up triangle
   filling the mask's bounding box; the best match wins (a rounded square passes as a circle).

`analyse` (strict, issue 26), given the prompted shape:
1. the foreground mask: pixels nearer the foreground than the background colour (projected on the line between
   them), isolated pixels kept;
2. shape IoU: the mask against the best-fitting ideal shape of the prompted kind as `scene.render` draws it
   (axis-aligned, a circle, a square or an apex-up triangle; centre and size fitted, pixels covered >= 1/2);
3. colour flatness: the fraction of the fitted shape's interior pixels (fully covered, one pixel in from its edge)
   within RGB distance 40 (of 0-255) of their median colour; also their RMS distance to it ("spread");
4. crisp: IoU >= 0.90 and flatness >= 0.95.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

import numpy as np

from sdjax.shapes64 import prompts
from sdjax.shapes64.scene import COLORS, PALETTE, SHAPES, coverage

_PALETTE_RGB = np.asarray([PALETTE[c] for c in COLORS], np.float32)
# A pixel is "maybe foreground" when this far (RGB euclidean, 0-255) from the background colour: at
# least 40 (~4 sigma of per-channel noise sigma=10), more on noisier backgrounds, always well under the
# smallest distance between two palette colours (~160).
_MIN_FOREGROUND_DISTANCE, _MAX_FOREGROUND_DISTANCE = 40.0, 80.0
# Fewer foreground pixels than this fraction of the image means "no shape drawn".
_MIN_FOREGROUND_FRACTION = 0.01
# The strict analyser (`analyse`): a shape is crisp when its mask overlaps the best ideal shape of its kind this much
# (IoU) and this fraction of its interior lies within _FLAT_DISTANCE (RGB euclidean, 0-255) of its median colour.
CRISP_IOU, CRISP_FLATNESS = 0.90, 0.95
_FLAT_DISTANCE = 40.0
_AREA_FRACTION = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}  # of the bounding box
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


def _foreground(pixels: np.ndarray) -> tuple[int, int | None, np.ndarray | None]:
    """(background palette index, foreground palette index or None, foreground mask (H, W) bool or None)."""
    bg_index, bg_rgb, threshold = _background(pixels)
    candidates = np.linalg.norm(pixels - bg_rgb, axis=-1) > threshold
    if candidates.sum() < _MIN_FOREGROUND_FRACTION * candidates.size:
        return bg_index, None, None
    fg_rgb = np.median(pixels[candidates], axis=0)
    # Half-way between background and foreground colour: anti-aliased or blurred edges split evenly.
    axis = fg_rgb - bg_rgb
    mask = (pixels - bg_rgb) @ axis > 0.5 * (axis @ axis)
    return bg_index, int(_nearest_palette(fg_rgb, exclude=bg_index)), mask


def judge(image: np.ndarray) -> dict[str, str | None]:
    """Reads colour, shape and background off an image of one shape on a plain background (the lenient judge).

    Args:
      image: (H, W, 3) RGB, uint8 in [0, 255] or float in [0, 1]; any H, W >= 8 (shapes64 is 64x64).
    Returns:
      {"color": palette name or None, "shape": "circle" | "square" | "triangle" or None,
       "background": palette name}; color and shape are None when no foreground is visible.
    """
    bg_index, fg_index, mask = _foreground(_as_rgb255(image))
    result = {"color": None, "shape": None, "background": COLORS[bg_index]}
    if fg_index is None:
        return result
    result["color"] = COLORS[fg_index]
    mask = _drop_isolated(mask)
    if mask.sum() >= _MIN_FOREGROUND_FRACTION * mask.size:
        result["shape"] = _classify_shape(mask)
    return result


def _ideal(shape: str, fit: tuple[float, float, float], height: int, width: int) -> np.ndarray:
    """Coverage (H, W) float32 of the ideal `shape` centred at (cx, cy) with side `size`, as scene.render draws it."""
    cx, cy, size = fit
    return coverage(shape, cx, cy, size, max(height, width))[:height, :width]


def _iou(mask: np.ndarray, shape: str, fit: tuple[float, float, float]) -> float:
    ideal = _ideal(shape, fit, *mask.shape) >= 0.5
    return float((mask & ideal).sum() / max(1, (mask | ideal).sum()))


def _first_guess(mask: np.ndarray, shape: str) -> tuple[float, float, float]:
    """Centre and size of the ideal shape with the mask's area and centroid (pixel centres at +0.5)."""
    rows, cols = np.nonzero(mask)
    size = float(np.sqrt(len(rows) / _AREA_FRACTION[shape]))
    # The triangle's centroid lies a sixth of its side below the centre of its bounding box.
    cy = rows.mean() + 0.5 - (size / 6 if shape == "triangle" else 0.0)
    return float(cols.mean() + 0.5), float(cy), size


def fit_shape(mask: np.ndarray, shape: str) -> tuple[tuple[float, float, float], float]:
    """The ideal `shape` (axis-aligned, as scene.render draws it) that best matches a foreground mask.

    mask: bool (H, W); shape: one of SHAPES. Hill-climbs the IoU over centre and size from the mask's centroid and
    area in steps of 4, 2, 1, 1/2 and 1/4 pixel. Returns ((cx, cy, size) in pixels, IoU in [0, 1]).
    """
    best = _first_guess(mask, shape)
    best_iou = _iou(mask, shape, best)
    moves = [np.array(m, float) for m in itertools.product((-1, 0, 1), repeat=3) if any(m)]
    for step in (4.0, 2.0, 1.0, 0.5, 0.25):
        improved = True
        while improved:
            improved = False
            for move in moves:
                candidate = tuple(float(v) for v in np.asarray(best) + step * move)
                if candidate[2] < 2:
                    continue
                iou = _iou(mask, shape, candidate)
                if iou > best_iou:
                    best, best_iou, improved = candidate, iou, True
    return best, best_iou


def _flatness(pixels: np.ndarray, shape: str, fit: tuple[float, float, float]) -> tuple[float, float]:
    """(fraction of interior pixels within _FLAT_DISTANCE of their median colour, their RMS distance to it)."""
    inside = _ideal(shape, fit, *pixels.shape[:2]) >= 1.0
    padded = np.pad(inside, 1)
    interior = inside & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    if not interior.any():
        return 0.0, float("nan")
    colours = pixels[interior]
    distance = np.linalg.norm(colours - np.median(colours, axis=0), axis=-1)
    return float(np.mean(distance <= _FLAT_DISTANCE)), float(np.sqrt(np.mean(distance**2)))


def analyse(image: np.ndarray, shape: str) -> dict[str, Any]:
    """The strict reading of an image prompted to show `shape` (see the module docstring).

    Args:
      image: (H, W, 3) RGB, uint8 in [0, 255] or float in [0, 1].
      shape: the prompted shape, one of SHAPES.
    Returns:
      {"color", "shape", "background": as :func:`judge`; "iou": float in [0, 1] (0 when nothing is drawn);
       "fit": (cx, cy, size) of the best-fitting ideal shape or None; "flatness": float in [0, 1]; "spread": RMS
       RGB distance (0-255) inside the shape (nan when nothing is drawn); "crisp": iou >= CRISP_IOU and
       flatness >= CRISP_FLATNESS}.
    """
    if shape not in SHAPES:
        raise JudgeError(f"unknown shape {shape!r}; accepted: {', '.join(SHAPES)}")
    pixels = _as_rgb255(image)
    result: dict[str, Any] = {**judge(image), "iou": 0.0, "fit": None}
    result.update(flatness=0.0, spread=float("nan"), crisp=False)
    _, fg_index, mask = _foreground(pixels)
    if fg_index is None or mask.sum() < _MIN_FOREGROUND_FRACTION * mask.size:
        return result
    fit, iou = fit_shape(mask, shape)
    flatness, spread = _flatness(pixels, shape, fit)
    result.update(iou=iou, fit=fit, flatness=flatness, spread=spread)
    result["crisp"] = iou >= CRISP_IOU and flatness >= CRISP_FLATNESS
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


def _percentiles(values: list[float]) -> dict[str, float]:
    p10, p50, p90 = np.nanpercentile(np.asarray(values, np.float64), (10, 50, 90)) if values else (np.nan,) * 3
    return {"p10": float(p10), "p50": float(p50), "p90": float(p90)}


def _summary(readings: list[dict[str, Any]], truths: list[dict[str, str]]) -> dict[str, Any]:
    pairs = list(zip(readings, truths, strict=True))
    n = max(1, len(pairs))
    return {
        "images": len(pairs),
        "crisp": sum(r["crisp"] for r, _ in pairs) / n,
        "color": sum(r["color"] == t["color"] for r, t in pairs) / n,
        "background": sum(r["background"] == t["background"] for r, t in pairs) / n,
        **{key: _percentiles([r[key] for r in readings]) for key in ("iou", "flatness", "spread")},
    }


def crisp_report(images: np.ndarray, captions: list[str]) -> dict[str, Any]:
    """The strict scores of images against their captions: :func:`analyse` per image, summarised.

    images: (N, H, W, 3) uint8 or float [0, 1]; captions: N shapes64 captions. Returns {"images": N, "crisp",
    "color", "background": fractions (foreground and background colour as :func:`judge` reads them); "iou",
    "flatness", "spread": {"p10", "p50", "p90"} percentiles; "shapes": {shape: the same keys over its images}}.
    """
    if len(images) != len(captions):
        raise JudgeError(f"got {len(images)} images but {len(captions)} captions; they must pair up")
    truths = [parse_caption(text) for text in captions]
    readings = [analyse(image, truth["shape"]) for image, truth in zip(images, truths, strict=True)]
    report = _summary(readings, truths)
    report["shapes"] = {}
    for shape in SHAPES:
        chosen = [i for i, truth in enumerate(truths) if truth["shape"] == shape]
        report["shapes"][shape] = _summary([readings[i] for i in chosen], [truths[i] for i in chosen])
    return report


def format_report(report: dict[str, Any]) -> str:
    """A markdown table of :func:`crisp_report`: a row per shape and one for all images."""
    lines = [
        "| shape | images | crisp | IoU p10 / p50 / p90 | flatness p10 / p50 / p90 | spread p10 / p50 / p90 | colour "
        "| background |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in [*report["shapes"].items(), ("all", report)]:
        iou, flat, spread = (" / ".join(f"{row[k][p]:{fmt}}" for p in ("p10", "p50", "p90")) for k, fmt in
                             (("iou", ".2f"), ("flatness", ".2f"), ("spread", ".1f")))  # fmt: skip
        lines.append(
            f"| {name} | {row['images']} | {100 * row['crisp']:.1f}% | {iou} | {flat} | {spread} | "
            f"{100 * row['color']:.1f}% | {100 * row['background']:.1f}% |"
        )
    return "\n".join(lines)


def eval_prompts() -> list[str]:
    """The v1 bar's 30 prompts: :func:`sdjax.shapes64.prompts.tuning_prompts` (kept under this name)."""
    return prompts.tuning_prompts()


def evaluate(
    pipe: Any, prompts: list[str] | None = None, num_images_per_prompt: int = 4, **generate_kwargs: Any
) -> tuple[dict[str, Any], np.ndarray]:
    """Generates ``num_images_per_prompt`` images per prompt with ``pipe.generate`` (its defaults: 50 steps of
    the model's sampler at the model's guidance, seed 0, unless ``generate_kwargs`` say otherwise) and judges them.

    Returns (scores, images (N, H, W, 3) float32 in [0, 1] with N = len(prompts) * num_images_per_prompt,
    prompt-major); scores: the lenient :func:`accuracy` keys and "strict": :func:`crisp_report`."""
    prompts = eval_prompts() if prompts is None else list(prompts)
    images = pipe.generate(prompts, num_images_per_prompt=num_images_per_prompt, **generate_kwargs)
    captions = [p for p in prompts for _ in range(num_images_per_prompt)]
    return {**accuracy(images, captions), "strict": crisp_report(images, captions)}, images


_PROMPT_SETS = {"heldout": prompts.heldout_prompts, "tuning": prompts.tuning_prompts}


def main(argv: list[str] | None = None) -> int:
    """``python -m sdjax.shapes64.judge [MODEL] [--prompts heldout|tuning] [--num-images N] [--steps S]
    [--guidance G] [--grid PNG]``: scores a shapes64 model and prints the lenient and the strict tables."""
    import argparse
    import time
    from pathlib import Path

    parser = argparse.ArgumentParser(description="Score a shapes64 text-to-image model with the shapes judges.")
    parser.add_argument("model", nargs="?", default=str(Path(__file__).resolve().parent / "model"))
    parser.add_argument("--prompts", default="heldout", choices=tuple(_PROMPT_SETS), help="which prompt set")
    parser.add_argument("--num-images", type=int, default=4, help="images per prompt")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=None, help="default: the model's")
    parser.add_argument("--sampler", default=None, help="default: the model's")
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
    args.sampler, args.guidance = pipe.sampling_settings(args.sampler or None, args.guidance)
    chosen = _PROMPT_SETS[args.prompts]()
    scores, images = evaluate(
        pipe, chosen, num_images_per_prompt=args.num_images, num_inference_steps=args.steps,
        guidance_scale=args.guidance, sampler=args.sampler, seed=args.seed,
    )  # fmt: skip
    print(
        f"{len(images)} images ({len(chosen)} {args.prompts} prompts x {args.num_images}), {args.steps} "
        f"{args.sampler} steps, guidance {args.guidance}, seed {args.seed}: {time.perf_counter() - start:.1f} s"
    )
    print("lenient judge:\n| colour | shape | background | all three |\n|---|---|---|---|")
    print("| " + " | ".join(f"{100 * scores[k]:.1f}%" for k in ("color", "shape", "background", "all")) + " |")
    print(f"strict judge (crisp: IoU >= {CRISP_IOU} and flatness >= {CRISP_FLATNESS}):")
    print(format_report(scores["strict"]))
    if args.grid:
        save_png(image_grid(images, cols=args.num_images), Path(args.grid))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
