"""The networks: pure flax.linen modules, NHWC, one file per network (vae, clip, unet; shared layers)."""

from typing import Any

from sdjax import _submodule


def __getattr__(name: str) -> Any:
    # Submodules on first use, after a bare `import sdjax` too.
    return _submodule(__name__, __path__, name)
