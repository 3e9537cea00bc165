"""sdjax: Stable Diffusion (latent diffusion) in JAX/Flax.

import sdjax
pipe = sdjax.StableDiffusion.from_pretrained("path/to/diffusers-folder")
images = pipe.generate(["a red circle on a blue background"], num_inference_steps=50)  # (N, H, W, 3) in [0, 1]
"""

from typing import Any

__all__ = ["SAMPLERS", "PipelineError", "StableDiffusion", "enable_compile_cache"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy, so that `import sdjax.models.unet` (research code, training) does not pull in the pipeline's
    # tokenizer and sampler imports.
    if name in ("StableDiffusion", "PipelineError"):
        from sdjax import pipeline

        return getattr(pipeline, name)
    if name == "enable_compile_cache":
        from sdjax.compile_cache import enable_compile_cache

        return enable_compile_cache
    if name == "SAMPLERS":
        from sdjax.samplers import SAMPLERS

        return SAMPLERS
    raise AttributeError(f"module 'sdjax' has no attribute {name!r}")
