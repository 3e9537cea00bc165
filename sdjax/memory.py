"""Memory checks before compiling a sampling program, and XLA's out-of-memory as one PipelineError line."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import jax

from sdjax import denoise, tokenizer
from sdjax import latents as latents_lib
from sdjax.errors import PipelineError


def host_memory_bytes() -> int | None:
    """Physical RAM of this host; None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def device_memory_bytes(device: Any) -> int | None:
    """Memory of ``device``: the allocator's limit on accelerators, physical RAM on the CPU; None if unknown."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return host_memory_bytes() if device.platform == "cpu" else None


def check_attention_memory(spec: denoise.DenoiseSpec, device: Any, per_device: int, latent_hw: tuple[int, int]) -> None:
    """PipelineError, before compiling, when the attention scores alone cannot fit the device (unfused attention
    only: XLA's; cuDNN flash attention holds no score matrix)."""
    from sdjax.models.layers import attention_implementation

    if attention_implementation(spec.unet.dtype) is not None:
        return
    batch = per_device * (2 if spec.guided else 1)
    need, have = denoise.attention_scores_bytes(spec.unet, batch, *latent_hw), device_memory_bytes(device)
    if have is not None and need > have:
        f = spec.vae.config.downsampling_factor
        raise PipelineError(
            f"{per_device} image(s) of {latent_hw[0] * f}x{latent_hw[1] * f} per device need at least "
            f"{need / 2**30:.1f} GiB for the UNet's attention on {device.platform}, which has {have / 2**30:.1f} "
            "GiB; use a smaller height/width or fewer images"
        )


@contextlib.contextmanager
def out_of_memory_as_error(n: int, device: Any):
    """XLA's RESOURCE_EXHAUSTED (compile or run) -> one PipelineError line."""
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        raise PipelineError(
            f"out of memory on {device.platform} generating {n} image(s): use a smaller height/width, fewer "
            "images, or dtype=bfloat16"
        ) from e


def check_host_memory(unet: Any, vae: Any, n: int, height: int, width: int) -> None:
    """PipelineError when the inputs and outputs of ``n`` images alone (text embeddings of both branches,
    latents, float32 images on device and host) exceed the host's memory."""
    h, w, c = latents_lib.latent_shape(vae, height, width)
    context = max(unet.config.cross_attention_dims())
    per_image = 4 * (2 * tokenizer.MAX_LENGTH * context + 4 * h * w * c + 2 * height * width * 3)
    have = host_memory_bytes()
    if have is not None and n * per_image > have:
        raise PipelineError(
            f"{n} images of {height}x{width} need more than the host's {have / 2**30:.1f} GiB for their inputs "
            f"and outputs alone ({n * per_image / 2**30:.1f} GiB); generate them in smaller batches"
        )
