"""Images in and out: reading init images of any mode, float images -> uint8, grids, PNGs with text metadata."""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from sdjax.errors import PipelineError


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


def load_image(image: Any, height: int, width: int) -> jax.Array:
    """Path / PIL image (any mode: 16-bit, palette, RGBA, grayscale) / array (H, W, 3) uint8 or float in [0, 1]
    -> (height, width, 3) float32 in [-1, 1]."""
    if isinstance(image, (str, os.PathLike)):
        image = read_image(image)
    if isinstance(image, Image.Image):
        array = np.asarray(to_rgb(image).resize((width, height), Image.LANCZOS), np.float32) / 255.0
    else:
        array = np.asarray(image)
        if array.ndim != 3 or array.shape[-1] != 3:
            raise PipelineError(f"init image must be (H, W, 3), got shape {array.shape}")
        if array.dtype == np.uint8:
            array = array.astype(np.float32) / 255.0
        elif np.issubdtype(array.dtype, np.floating):
            array = array.astype(np.float32)
            if not (np.isfinite(array).all() and array.min() >= 0.0 and array.max() <= 1.0):
                raise PipelineError(
                    f"a float init image must be finite and in [0, 1], got values in [{array.min()}, {array.max()}]"
                    " (divide 0-255 data by 255, or pass uint8)"
                )
        else:
            raise PipelineError(f"init image arrays must be uint8 or float in [0, 1], got dtype {array.dtype}")
        if array.shape[:2] != (height, width):
            array = np.asarray(jax.image.resize(array, (height, width, 3), "bilinear"))
    return jnp.asarray(array * 2.0 - 1.0)


def read_image(path: str | os.PathLike, what: str = "init image") -> Image.Image:
    """Opens and fully reads an image file; PipelineError naming the file (as ``what``) when it is not a readable
    image."""
    try:
        with Image.open(path) as f:
            f.load()
            return f.copy()
    except Image.DecompressionBombError as e:  # a small file that would decode to gigabytes
        raise PipelineError(f"{what} {path} is refused: {str(e).rstrip('.')}; resize it below that") from None
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise PipelineError(f"{what} {path} cannot be read as an image: {e}") from e


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB of any PIL mode: 16-bit and 32-bit integer / float grayscale are scaled, not clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, np.float64)
        scale = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        if image.mode == "F" and values.max() <= 1.0:
            scale = 1.0
        gray = np.clip(np.round(values / scale * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))  # transparent -> white, as viewers show
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")
