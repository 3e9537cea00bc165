"""shapes64: a synthetic world of one coloured shape on a solid background (64x64), with captions.

- `scene.py`: drawing, sampling and captions (numpy only; re-exported here);
- `dataset.py`: the TFDS builder "shapes64" (imports TensorFlow Datasets; import it explicitly);
- `prompts.py`: the tuning and the held-out evaluation prompts (fixed before v2 was trained);
- `judge.py`: reads colour, shape and background off an image to score a model (numpy only);
  `python -m sdjax.shapes64.judge MODEL`;
- `model/`: the shipped model, a diffusers folder trained by this repository (``MODEL_DIR``).
"""

from pathlib import Path
from typing import Any

from sdjax import _submodule
from sdjax.shapes64.scene import (
    CAPTION_TEMPLATE,
    COLORS,
    IMAGE_SIZE,
    MAX_SIZE,
    MIN_SIZE,
    PALETTE,
    SHAPES,
    SceneError,
    caption,
    captions,
    coverage,
    example,
    render,
    sample_scene,
)

MODEL_DIR = Path(__file__).resolve().parent / "model"  # the shipped model: sdjax.from_pretrained(MODEL_DIR)

__all__ = [
    "CAPTION_TEMPLATE",
    "COLORS",
    "IMAGE_SIZE",
    "MAX_SIZE",
    "MIN_SIZE",
    "MODEL_DIR",
    "PALETTE",
    "SHAPES",
    "SceneError",
    "caption",
    "captions",
    "coverage",
    "example",
    "render",
    "sample_scene",
]


def __getattr__(name: str) -> Any:
    # Submodules on first use, after a bare `import sdjax` too.
    return _submodule(__name__, __path__, name)
