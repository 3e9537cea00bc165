"""Writes the LoRA of an sdjax LoRA training workdir (:mod:`sdjax.train.lora_stage`) as the two files the
community uses, both read by diffusers' ``load_lora_weights`` and by sdjax's:

- ``pytorch_lora_weights.safetensors``, as diffusers' ``save_lora_weights`` writes it: PEFT names
  ``unet.<module>.lora_A.weight`` (down, (r, in[, kh, kw])) / ``.lora_B.weight`` (up, (out, r[, 1, 1])),
  ``text_encoder.text_model.<module>...``, and the PEFT ``LoraConfig`` of each component (``r``, ``lora_alpha``,
  ``target_modules``) in the ``lora_adapter_metadata`` of the file's metadata, with ``"format": "pt"``;
- ``kohya_lora.safetensors``, kohya / A1111 names: ``lora_unet_<module with "." -> "_">`` and
  ``lora_te_text_model_...``, ``.lora_down.weight``, ``.lora_up.weight`` (conv layers as (r, in, kh, kw) and
  (out, r, 1, 1)) and a scalar ``.alpha`` per layer.

Module names come from :func:`sdjax.loading.lora.module_name`, the mapping loading resolves files with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from flax import traverse_util
from safetensors.numpy import save_file

from sdjax import checkpoint, weights
from sdjax.errors import PipelineError
from sdjax.loading import lora

PEFT_FILE = lora.LORA_FILE_NAMES[0]  # pytorch_lora_weights.safetensors
KOHYA_FILE = "kohya_lora.safetensors"
CONFIG_FILE = "lora_config.json"  # in DIR/model: {component: PEFT LoraConfig fields}
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
DTYPES = {"float32": np.float32, "float16": np.float16}


def read_workdir_lora(workdir: str | Path, ema: bool = True) -> tuple[dict[str, dict], dict[str, Any]]:
    """(PEFT configs by component, factors ``{component: {flax path: {"down", "up"}}}`` as float32 numpy) of a
    LoRA workdir's latest checkpoint (its EMA factors when ``ema`` and the run kept them)."""
    workdir = Path(workdir)
    config_file = workdir / checkpoint.MODEL_DIR / CONFIG_FILE
    if not checkpoint.is_workdir(workdir) or not config_file.is_file():
        raise PipelineError(
            f"{workdir} is not a LoRA training workdir (expected model/{CONFIG_FILE} and checkpoints/); train one "
            "with a config whose stage is 'lora' (configs/sd15_lora.py)"
        )
    try:
        trained = checkpoint.load_trained_params(workdir, ema=ema)
    except checkpoint.CheckpointError as e:
        raise PipelineError(str(e)) from e
    configs = json.loads(config_file.read_text())
    factors = {}
    for component, tree in trained["lora"].items():
        flat = traverse_util.flatten_dict(tree)
        factors[component] = {}
        for path, value in flat.items():
            factors[component].setdefault((*path[:-1], "kernel"), {})[path[-1]] = np.asarray(value, np.float32)
    return configs, factors


def merged_params(params: dict[str, Any], workdir: str | Path, factors: dict[str, Any]) -> dict[str, Any]:
    """``params`` (a pipeline's) with a LoRA workdir's ``factors`` (its checkpoint's ``"lora"`` item) merged in:
    W + lora_alpha / r * up @ down per adapted kernel, as training merges them; other arrays are the same objects."""
    configs = json.loads((Path(workdir) / checkpoint.MODEL_DIR / CONFIG_FILE).read_text())
    out = dict(params)
    for component, tree in factors.items():
        scale = configs[component]["lora_alpha"] / configs[component]["r"]
        flat, pairs = traverse_util.flatten_dict(params[component]), traverse_util.flatten_dict(tree)
        for layer in {path[:-1] for path in pairs}:
            kernel = (*layer, "kernel")
            flat[kernel] = lora.merged_kernel(flat[kernel], [(pairs[(*layer, "down")], pairs[(*layer, "up")], scale)])
        out[component] = traverse_util.unflatten_dict(flat)
    return out


def lora_state_dicts(
    workdir: str | Path, dtype: str = "float32", ema: bool = True
) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, np.ndarray]]:
    """(PEFT tensors, PEFT file metadata, kohya tensors) of a LoRA workdir, weights stored as ``dtype``."""
    if dtype not in DTYPES:
        raise PipelineError(f"cannot save LoRA weights as {dtype!r}; accepted: {', '.join(DTYPES)}")
    configs, factors = read_workdir_lora(workdir, ema)
    peft, kohya, metadata = {}, {}, {}
    for component, layers in sorted(factors.items()):
        module = weights.build_component(Path(workdir) / checkpoint.MODEL_DIR / component)
        alpha = np.asarray(configs[component]["lora_alpha"], np.float32)
        for path, pair in sorted(layers.items()):
            down, up = pair["down"], pair["up"]
            if down.ndim == 4:  # a conv layer: PyTorch's Conv2d up factor is a 1x1 conv
                up = up[:, :, None, None]
            down, up = (np.ascontiguousarray(x.astype(DTYPES[dtype])) for x in (down, up))
            name = lora.module_name(module, path)
            peft[f"{component}.{name}.lora_A.weight"], peft[f"{component}.{name}.lora_B.weight"] = down, up
            kohya_name = KOHYA_PREFIXES[component] + name.replace(".", "_")
            kohya[f"{kohya_name}.lora_down.weight"], kohya[f"{kohya_name}.lora_up.weight"] = down, up
            kohya[f"{kohya_name}.alpha"] = alpha
        metadata.update({f"{component}.{k}": v for k, v in configs[component].items()})
    file_metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(metadata, indent=2, sort_keys=True)}
    return peft, file_metadata, kohya


def write_lora_files(workdir: str | Path, folder: str | Path, dtype: str = "float32", ema: bool = True) -> None:
    """Writes ``folder/pytorch_lora_weights.safetensors`` (diffusers / PEFT) and ``folder/kohya_lora.safetensors``
    (kohya / A1111) of a LoRA workdir (see the module docstring)."""
    peft, metadata, kohya = lora_state_dicts(workdir, dtype, ema)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(peft, folder / PEFT_FILE, metadata=metadata)
    save_file(kohya, folder / KOHYA_FILE, metadata={"format": "pt"})
