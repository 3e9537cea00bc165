"""Canny edge maps (Canny 1986, "A Computational Approach to Edge Detection") for ControlNet control images,
in numpy and scipy.ndimage, no OpenCV:

    control_image = sdjax.edges.canny(image, low=100, high=200)  # uint8 (H, W, 3): white edges on black

Gaussian blur, 3x3 Sobel gradients, non-maximum suppression along the gradient direction (4 sectors), hysteresis
(weak edges kept where 8-connected to a strong one). Thresholds are in OpenCV's units, so values tuned for
``cv2.Canny(image, low, high)`` (what canny ControlNets were trained on) carry over: the L1 gradient magnitude
|gx| + |gy| of 0-255 pixels, on a colour image the channel with the largest magnitude at each pixel (as
``cv2.Canny`` reads colour input: a red shape on a blue background of equal brightness still has edges).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from sdjax.errors import PipelineError
from sdjax.images import read_image, to_rgb

_TAN_22_5 = np.tan(np.pi / 8)
_TAN_67_5 = np.tan(3 * np.pi / 8)


def canny(image: Any, low: float = 100.0, high: float = 200.0, sigma: float = 1.0) -> np.ndarray:
    """Edge map of ``image``.

    Args:
      image: a path, PIL image, or array (H, W), (H, W, 1) or (H, W, 3): uint8, or float in [0, 1].
      low, high: hysteresis thresholds, 0 <= low <= high, on the Sobel magnitude |gx| + |gy| of 0-255 pixels
        (as ``cv2.Canny``): pixels above ``high`` start edges, pixels above ``low`` continue them.
      sigma: standard deviation in pixels of the Gaussian blur before the gradients; 0 for none (as ``cv2.Canny``).
    Returns:
      uint8 (H, W, 3): 255 on edge pixels, 0 elsewhere, the same in each channel (what canny ControlNets take).
    """
    if not (np.isfinite([low, high, sigma]).all() and 0 <= low <= high and sigma >= 0):
        raise PipelineError(f"canny needs 0 <= low <= high and sigma >= 0, got low={low}, high={high}, sigma={sigma}")
    pixels = _pixels(image)
    if sigma > 0:  # mode "mirror" is OpenCV's default border (reflect-101)
        pixels = ndimage.gaussian_filter(pixels, (sigma, sigma, 0), mode="mirror", truncate=3.0)
    gx, gy, magnitude = _strongest_channel_gradient(pixels)
    edges = _hysteresis(_non_maximum_suppression(magnitude, gx, gy), low, high)
    return np.repeat(edges[..., None], 3, axis=-1).astype(np.uint8) * np.uint8(255)


def _pixels(image: Any) -> np.ndarray:
    """float32 (H, W, C) in [0, 255]."""
    if isinstance(image, (str, os.PathLike)):
        image = read_image(image)
    if isinstance(image, Image.Image):
        image = np.asarray(to_rgb(image))
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3) or min(array.shape[:2]) < 2:
        raise PipelineError(f"canny reads (H, W), (H, W, 1) or (H, W, 3) images of at least 2x2, got {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.floating) and np.isfinite(array).all() and 0 <= array.min() <= array.max() <= 1:
        return array.astype(np.float32) * 255.0
    raise PipelineError(f"canny reads uint8 images or float images in [0, 1], got {array.dtype} values")


def _strongest_channel_gradient(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """3x3 Sobel gx, gy (H, W) of the channel with the largest |gx| + |gy| at each pixel, and that magnitude."""
    p = np.pad(pixels, ((1, 1), (1, 1), (0, 0)), mode="reflect")  # reflect-101, as OpenCV
    gx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    gy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    magnitude = np.abs(gx) + np.abs(gy)
    best = np.argmax(magnitude, axis=-1)[..., None]
    return (np.take_along_axis(a, best, axis=-1)[..., 0] for a in (gx, gy, magnitude))


def _non_maximum_suppression(magnitude: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """The magnitude where it is a maximum along the gradient direction (rounded to 0, 45, 90 or 135 degrees:
    greater than the neighbour behind, at least the one ahead, as OpenCV), else 0."""
    m = np.pad(magnitude, 1)
    h, w = magnitude.shape

    def neighbour(dy: int, dx: int) -> np.ndarray:
        return m[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    ax, ay = np.abs(gx), np.abs(gy)
    horizontal = ay <= _TAN_22_5 * ax  # the gradient points along x: compare left and right
    vertical = ay > _TAN_67_5 * ax
    falling = ~horizontal & ~vertical & (gx * gy > 0)  # down-right in image coordinates (y down)
    rising = ~horizontal & ~vertical & ~falling
    keep = np.zeros_like(magnitude, dtype=bool)
    for sector, (dy, dx) in ((horizontal, (0, 1)), (vertical, (1, 0)), (falling, (1, 1)), (rising, (1, -1))):
        keep |= sector & (magnitude > neighbour(-dy, -dx)) & (magnitude >= neighbour(dy, dx))
    return np.where(keep, magnitude, 0.0)


def _hysteresis(thin: np.ndarray, low: float, high: float) -> np.ndarray:
    """bool (H, W): pixels above ``low`` in an 8-connected group that holds a pixel above ``high``."""
    labels, count = ndimage.label(thin > low, structure=np.ones((3, 3), bool))
    strong = np.zeros(count + 1, bool)
    strong[np.unique(labels[thin > high])] = True
    strong[0] = False
    return strong[labels]
