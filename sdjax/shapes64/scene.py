"""The shapes64 world: one anti-aliased coloured shape on a solid background, 64x64 RGB, with its caption.

Pure numpy (no TensorFlow). A scene is a pure function of its parameters, and example `i` of a split a pure
function of `(seed, split, i)`, so any subset of the dataset (`sdjax.shapes64.dataset`) can be regenerated
bit-exactly:

    image = render("red", "circle", "white", cx=32, cy=30, size=36)  # uint8 (64, 64, 3)
    ex = example(seed=0, split="train", index=7)  # {"image", "caption", "color", "shape", "background"}
"""

from __future__ import annotations

import numpy as np

IMAGE_SIZE = 64
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Shapes render() draws that examples never show (the dataset and its vocabulary stay as they are): a word the shipped
# model has not seen, for the LoRA demo (configs/shapes64_lora.py teaches it "diamond").
NEW_SHAPES: tuple[str, ...] = ("diamond",)
MIN_SIZE, MAX_SIZE = 24, 44
CAPTION_TEMPLATE = "a {color} {shape} on a {background} background"
# Sub-pixel samples per axis: anti-aliased edges look like real photos of shapes to the VAE/UNet.
_SUPERSAMPLING = 4
# Keeps the example streams of the two splits disjoint for the same seed.
_SPLIT_IDS = {"train": 0, "validation": 1}


class SceneError(ValueError):
    """A scene or dataset config outside what shapes64 draws."""


def caption(color: str, shape: str, background: str) -> str:
    """The caption of a scene, e.g. "a red circle on a white background"."""
    return CAPTION_TEMPLATE.format(color=color, shape=shape, background=background)


def captions() -> list[str]:
    """Every caption `example` can produce (90: colour-major, then shape, then each other background)."""
    return [caption(c, s, b) for c in COLORS for s in SHAPES for b in COLORS if c != b]


def _check_scene(color: str, shape: str, background: str, cx: float, cy: float, size: float, image_size: int):
    if color not in PALETTE or background not in PALETTE:
        raise SceneError(f"unknown colour {color!r} or {background!r}; accepted: {', '.join(COLORS)}")
    if color == background:
        raise SceneError(f"shape colour and background are both {color!r}; they must differ")
    if shape not in SHAPES + NEW_SHAPES:
        raise SceneError(f"unknown shape {shape!r}; accepted: {', '.join(SHAPES + NEW_SHAPES)}")
    half = size / 2
    if not (size > 0 and half <= cx <= image_size - half and half <= cy <= image_size - half):
        raise SceneError(
            f"shape of size {size} centred at ({cx}, {cy}) does not lie inside the {image_size}x{image_size} "
            f"image; accepted: size > 0 and size/2 <= cx, cy <= {image_size} - size/2"
        )


def _inside(shape: str, dx: np.ndarray, dy: np.ndarray, half: float) -> np.ndarray:
    if shape == "circle":
        return dx**2 + dy**2 <= half**2
    if shape == "diamond":  # the square turned by 45 degrees, corners on the box's edge midpoints
        return np.abs(dx) + np.abs(dy) <= half
    in_box = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "square":
        return in_box
    # Apex at the top centre, base along the bottom edge: the half-width grows linearly from 0 to `half`.
    return in_box & (np.abs(dx) <= (dy + half) / 2)


def coverage(shape: str, cx: float, cy: float, size: float, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Fraction of each pixel covered by the shape: float32 (image_size, image_size) in [0, 1].

    Pixel (row i, column j) spans [j, j+1) x [i, i+1); (cx, cy) is the centre of the shape's
    axis-aligned bounding box, whose side is `size` pixels.
    """
    half, n = size / 2, _SUPERSAMPLING
    # Only the pixels under the bounding box can be covered; sampling just those is ~3x faster.
    x0, y0 = (max(0, int(np.floor(c - half))) for c in (cx, cy))
    x1, y1 = (min(image_size, int(np.ceil(c + half))) for c in (cx, cy))
    offsets = (np.arange(n) + 0.5) / n
    xs = (np.arange(x0, x1)[:, None] + offsets).reshape(-1)
    ys = (np.arange(y0, y1)[:, None] + offsets).reshape(-1)
    inside = _inside(shape, xs[None, :] - cx, ys[:, None] - cy, half).view(np.uint8)
    counts = inside.reshape(y1 - y0, n, x1 - x0, n).sum(axis=3, dtype=np.uint8).sum(axis=1, dtype=np.uint8)
    out = np.zeros((image_size, image_size), np.float32)
    out[y0:y1, x0:x1] = counts / np.float32(n * n)
    return out


def render(
    color: str,
    shape: str,
    background: str,
    cx: float,
    cy: float,
    size: float,
    image_size: int = IMAGE_SIZE,
) -> np.ndarray:
    """Draws one anti-aliased shape on a solid background.

    Args:
      color, background: palette names (`COLORS`), different from each other.
      shape: one of `SHAPES` (or `NEW_SHAPES`); the triangle has its apex up and a horizontal base.
      cx, cy: centre of the shape's bounding box in pixels (x right, y down).
      size: side of the bounding box in pixels; the box must lie inside the image.
    Returns:
      uint8 (image_size, image_size, 3) RGB image; a deterministic function of the arguments.
    """
    _check_scene(color, shape, background, cx, cy, size, image_size)
    alpha = coverage(shape, cx, cy, size, image_size)[..., None]
    fg = np.asarray(PALETTE[color], np.float32)
    bg = np.asarray(PALETTE[background], np.float32)
    return np.round(bg + alpha * (fg - bg)).astype(np.uint8)


def sample_scene(rng: np.random.Generator, image_size: int = IMAGE_SIZE) -> dict:
    """Draws scene parameters: colour != background, size in [24, 44], the shape fully inside the image."""
    color, background = rng.choice(len(COLORS), size=2, replace=False)
    size = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
    cx, cy = rng.uniform(size / 2, image_size - size / 2, size=2)
    return {
        "color": COLORS[color],
        "shape": SHAPES[int(rng.integers(len(SHAPES)))],
        "background": COLORS[background],
        "cx": float(cx),
        "cy": float(cy),
        "size": size,
    }


def example(seed: int, split: str, index: int) -> dict:
    """Example `index` of `split`: {"image": uint8 (64, 64, 3), "caption", "color", "shape", "background"}."""
    scene = sample_scene(np.random.default_rng([seed, _SPLIT_IDS[split], index]))
    return {
        "image": render(**scene),
        "caption": caption(scene["color"], scene["shape"], scene["background"]),
        "color": scene["color"],
        "shape": scene["shape"],
        "background": scene["background"],
    }
