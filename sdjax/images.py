"""Image helpers shared by sample.py and training: float images -> uint8, grids, PNGs with text metadata."""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image, PngImagePlugin


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] (..., H, W, 3) -> uint8 (rounded, clipped)."""
    return np.clip(np.round(np.asarray(images, np.float32) * 255.0), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, cols: int | None = None, pad: int = 2) -> np.ndarray:
    """(N, H, W, 3) float [0, 1] or uint8 -> one uint8 image of ceil(N / cols) rows, white padding between."""
    images = images if images.dtype == np.uint8 else to_uint8(images)
    n, h, w, c = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i, image in enumerate(images):
        r, q = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y : y + h, x : x + w] = image
    return grid


def save_png(image: np.ndarray, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Writes one (H, W, 3) image (float [0, 1] or uint8) as PNG with ``metadata`` as tEXt chunks."""
    image = image if image.dtype == np.uint8 else to_uint8(image)
    info = PngImagePlugin.PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(key, str(value))
    Image.fromarray(image).save(path, pnginfo=info)
