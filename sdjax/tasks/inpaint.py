"""Inpainting: repaint the masked region of an init image, diffusers' semantics, for both kinds of model.

- Inpainting UNets (in_channels 9: SD 1.5 / 2 inpainting, SDXL inpainting) read, after the latents, the latent mask
  (1 channel) and the masked image's latents (C channels) at every evaluation: a ``before_model`` hook.
- Ordinary 4-channel UNets denoise everything; after every step the latents outside the mask are replaced by the
  init latents noised to the next evaluation's level (``row.noised_next``; none after the last): an
  ``after_step`` hook, as diffusers' ``StableDiffusionInpaintPipeline`` does.

The mask is white (>= 0.5) where to repaint; it is binarised, and resized as diffusers' mask processor does (PIL:
Lanczos, then grayscale; arrays: nearest). The latent mask takes pixel (f*i, f*j) (nearest, as
``torch.nn.functional.interpolate``), f the VAE's downsampling factor; the masked image is the init image in
[-1, 1] with masked pixels set to 0. ``strength`` 1 starts from pure noise; below 1 from the init latents noised
to the plan's first step. Inputs: ``init`` (B, H, W, 3) in [-1, 1], ``mask`` (B, h, w, 1) in {0, 1},
``masked_image`` (B, H, W, 3) (9-channel models only).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from sdjax import samplers
from sdjax.errors import PipelineError
from sdjax.images import load_image, read_image, to_rgb
from sdjax.tasks.base import Prepared, Run, Task
from sdjax.tasks.img2img import broadcast_image, encode_images, is_latents

MASKED_POSTERIOR = 3  # the random stream of the masked image's posterior sample (sdjax.denoise's tags 0-2)


@dataclasses.dataclass(frozen=True)
class Inpaint(Task):
    """nine_channel: the UNet reads mask and masked-image latents; strength_max: start from noise (strength 1)."""

    nine_channel: bool
    strength_max: bool = True

    key: ClassVar[str] = "inpaint"

    def derive(self, run: Run) -> dict[str, Any]:
        arrays, out = run.arrays(self), {}
        if not (self.nine_channel and self.strength_max):  # the blend's, or the start's init latents
            out["image_latents"] = encode_images(run, arrays["init"])
        if self.nine_channel:
            out["masked_latents"] = encode_images(run, arrays["masked_image"], MASKED_POSTERIOR)
        return out

    def start(self, run: Run, noise: jax.Array) -> jax.Array | None:
        if self.strength_max:
            return None  # the scaled noise, as text-to-image
        return samplers.noised_latents(run.spec.plan, run.derived[self.key]["image_latents"], noise)

    def hooks(self, run: Run) -> samplers.Hooks:
        mask, derived = run.arrays(self)["mask"].astype(jnp.float32), run.derived[self.key]
        if self.nine_channel:
            extra_channels = jnp.concatenate([mask, derived["masked_latents"]], axis=-1)
            return samplers.Hooks(before_model=lambda x_in, row: (jnp.concatenate([x_in, extra_channels], -1), {}))
        init, noise = derived["image_latents"], run.inputs["noise"].astype(jnp.float32)
        return samplers.Hooks(after_step=lambda x, row: (1 - mask) * row.noised_next(init, noise) + mask * x)


def prepare(
    init_image: Any, mask_image: Any, n: int, height: int, width: int, factor: int, nine_channel: bool, strength: float
) -> Prepared:
    """The inpainting task for ``n`` images of ``height`` x ``width`` (multiples of the VAE factor ``factor``):
    init image and mask read, checked and resized; PipelineError (one line) when they cannot be."""
    if is_latents(init_image):
        raise PipelineError("inpainting repaints an image: pass init_image as an image (path, PIL, (H, W, 3) array)")
    if isinstance(init_image, (str, os.PathLike)):
        init_image = read_image(init_image)
    if isinstance(mask_image, (str, os.PathLike)):
        mask_image = read_image(mask_image, "mask image")
    image_size, mask_size = _size(init_image), _size(mask_image)
    if image_size is not None and mask_size is not None and image_size != mask_size:
        raise PipelineError(
            f"mask_image is {mask_size[1]}x{mask_size[0]} and init_image {image_size[1]}x{image_size[0]} (WxH): "
            "pass a mask of the image's size (both are then resized to height x width)"
        )
    init = load_image(init_image, height, width)
    mask = load_mask(mask_image, height, width)
    arrays = {"init": broadcast_image(init, n), "mask": broadcast_image(mask[::factor, ::factor, None], n)}
    if nine_channel:
        arrays["masked_image"] = broadcast_image(init * (mask < 0.5)[..., None], n)
    return Prepared(Inpaint(nine_channel, strength == 1.0), arrays)


def load_mask(mask: Any, height: int, width: int) -> jax.Array:
    """PIL image / array (H, W) or (H, W, 1), uint8, bool or float in [0, 1] -> (height, width) float32 in {0, 1}
    (1 = repaint): resized as diffusers' mask processor (PIL: Lanczos then grayscale; arrays: nearest), then
    binarised at 0.5."""
    if isinstance(mask, Image.Image):
        if mask.mode not in ("L", "RGB"):
            mask = to_rgb(mask)
        if mask.size != (width, height):
            mask = mask.resize((width, height), Image.LANCZOS)
        values = np.asarray(mask.convert("L"), np.float32) / 255.0
    else:
        values = _mask_array(mask)
        if values.shape != (height, width):  # nearest, as torch.nn.functional.interpolate's default
            rows = np.arange(height) * values.shape[0] // height
            cols = np.arange(width) * values.shape[1] // width
            values = values[rows][:, cols]
    return jnp.asarray((values >= 0.5).astype(np.float32))


def _mask_array(mask: Any) -> np.ndarray:
    array = np.asarray(mask)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        raise PipelineError(
            f"mask_image must be one channel: a PIL image, a path or an (H, W) / (H, W, 1) array, got shape "
            f"{array.shape}"
        )
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype == bool:
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.floating) and np.isfinite(array).all() and 0 <= array.min() <= array.max() <= 1:
        return array.astype(np.float32)
    raise PipelineError(f"mask arrays must be uint8, bool or float in [0, 1], got {array.dtype}")


def _size(image: Any) -> tuple[int, int] | None:
    """(height, width) of a PIL image or an image / mask array."""
    if isinstance(image, Image.Image):
        return image.size[1], image.size[0]
    shape = np.shape(image)
    return tuple(shape[:2]) if len(shape) in (2, 3) else None
