"""sdjax: Stable Diffusion (latent diffusion) in JAX/Flax.

import sdjax
pipe = sdjax.StableDiffusion.from_pretrained("path/to/diffusers-folder")
images = pipe.generate(["a red circle on a blue background"], num_inference_steps=50)  # (N, H, W, 3) in [0, 1]
xl = sdjax.StableDiffusionXL.from_pretrained("path/to/sdxl-folder")
any_pipe = sdjax.from_pretrained("path/to/any")  # StableDiffusion or StableDiffusionXL
controlnet = sdjax.ControlNet.from_pretrained("path/to/controlnet")  # diffusers folder or .safetensors
"""

import importlib
import pkgutil
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
# The pipeline class of each model family, the one place a family is chosen (by sdjax.loading.family_of).
FAMILIES = {"sd": "StableDiffusion", "sdxl": "StableDiffusionXL"}


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
    return _submodule(__name__, __path__, name)


def _submodule(package: str, path: list[str], name: str) -> Any:
    """``package.name`` imported on first use when ``name`` is one of its submodules: a package's module-level
    ``__getattr__``, so that a bare ``import sdjax`` (which imports neither JAX nor TensorFlow) reaches
    ``sdjax.tokenizer``, ``sdjax.weights``, ``sdjax.shapes64.judge`` and the like."""
    if name in submodules(path):
        return importlib.import_module(f"{package}.{name}")
    raise AttributeError(f"module {package!r} has no attribute {name!r}")


def submodules(path: list[str]) -> list[str]:
    """The names of the modules and packages in a package's ``__path__``."""
    return [module.name for module in pkgutil.iter_modules(path)]


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, *submodules(__path__)})


def from_pretrained(path: Any, dtype: Any = None, variant: str | None = None, **kwargs: Any) -> Any:
    """A ``StableDiffusion`` or a ``StableDiffusionXL``, whichever the folder's model_index.json (or workdir)
    describes, or a single file's keys. ``dtype`` defaults to float32; other arguments as the class's
    ``from_pretrained``."""
    import jax.numpy as jnp

    from sdjax.loading import family_of

    cls = __getattr__(FAMILIES[family_of(path)])
    return cls.from_pretrained(path, jnp.float32 if dtype is None else dtype, variant, **kwargs)
