"""A model folder's recommended generation settings: ``generation_config.json`` beside ``model_index.json``, e.g.
``{"sampler": "euler_ancestral", "guidance_scale": 5.0}``, as a transformers model keeps its generation defaults in
its own ``generation_config.json``.

diffusers ignores the file. sdjax's ``generate`` and ``sample.py`` use its values where the caller gives none; a
folder without it gets the family's defaults (SD: ddim, 7.5; SDXL: its scheduler's sampler, 5.0). Training writes
a config's ``generation`` dict there (``configs/shapes64.py``), and ``save_pretrained`` / ``sdjax.export`` keep it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sdjax.arguments import finite_number
from sdjax.errors import PipelineError
from sdjax.samplers import SAMPLERS

FILENAME = "generation_config.json"
FIELDS = ("sampler", "guidance_scale")


def check(settings: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The settings as a plain dict, or one PipelineError line naming ``where``, the bad field and what is accepted."""
    if not isinstance(settings, Mapping):
        raise PipelineError(f"{where}: expected an object with fields {', '.join(FIELDS)}, got {settings!r}")
    unknown = sorted(set(settings) - set(FIELDS))
    if unknown:
        raise PipelineError(f"{where}: unknown field(s) {', '.join(unknown)}; accepted: {', '.join(FIELDS)}")
    if "sampler" in settings and settings["sampler"] not in SAMPLERS:
        raise PipelineError(f"{where}: unknown sampler {settings['sampler']!r}; choose one of: {', '.join(SAMPLERS)}")
    if "guidance_scale" in settings:
        finite_number(f"{where}: guidance_scale", settings["guidance_scale"], 0.0)
    return dict(settings)


def read(folder: str | Path) -> dict[str, Any]:
    """``folder/generation_config.json`` checked ({} when the folder has none)."""
    path = Path(folder) / FILENAME
    if not path.is_file():
        return {}
    try:
        settings = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PipelineError(f"{path}: not a readable JSON file ({e})") from e
    return check(settings, str(path))


def write(folder: str | Path, settings: Mapping[str, Any]) -> None:
    """Writes ``folder/generation_config.json`` (nothing when ``settings`` is empty)."""
    if settings:
        settings = check(settings, FILENAME)
        (Path(folder) / FILENAME).write_text(json.dumps(settings, indent=2) + "\n")
