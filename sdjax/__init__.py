"""sdjax: Stable Diffusion (latent diffusion) in JAX/Flax.

import sdjax
pipe = sdjax.StableDiffusion.from_pretrained("path/to/diffusers-folder")
images = pipe.generate(["a red circle on a blue background"], num_inference_steps=50)  # (N, H, W, 3) in [0, 1]
xl = sdjax.StableDiffusionXL.from_pretrained("path/to/sdxl-folder")
any_pipe = sdjax.from_pretrained("path/to/any")  # StableDiffusion or StableDiffusionXL
controlnet = sdjax.ControlNet.from_pretrained("path/to/controlnet")  # diffusers folder or .safetensors
"""

from typing import Any

__all__ = [
    "SAMPLERS",
    "ControlNet",
    "PipelineError",
    "StableDiffusion",
    "StableDiffusionXL",
    "enable_compile_cache",
    "from_pretrained",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy, so that `import sdjax.models.unet` (research code, training) does not pull in the pipeline's
    # tokenizer and sampler imports.
    if name in ("StableDiffusion", "PipelineError"):
        from sdjax import pipeline

        return getattr(pipeline, name)
    if name == "StableDiffusionXL":
        from sdjax.sdxl import StableDiffusionXL

        return StableDiffusionXL
    if name == "ControlNet":
        from sdjax.controlnet import ControlNet

        return ControlNet
    if name == "enable_compile_cache":
        from sdjax.compile_cache import enable_compile_cache

        return enable_compile_cache
    if name == "SAMPLERS":
        from sdjax.samplers import SAMPLERS

        return SAMPLERS
    raise AttributeError(f"module 'sdjax' has no attribute {name!r}")


def from_pretrained(path: Any, dtype: Any = None, variant: str | None = None, **kwargs: Any) -> Any:
    """A ``StableDiffusion`` or a ``StableDiffusionXL``, whichever the folder's model_index.json (or workdir)
    describes, or a single file's keys. ``dtype`` defaults to float32; other arguments as the class's
    ``from_pretrained``."""
    import jax.numpy as jnp

    from sdjax.loading import family_of

    cls = __getattr__("StableDiffusionXL" if family_of(path) == "sdxl" else "StableDiffusion")
    return cls.from_pretrained(path, jnp.float32 if dtype is None else dtype, variant, **kwargs)
