"""Single-file SDXL checkpoints (the layout of ``sd_xl_base_1.0.safetensors`` / ``sd_xl_refiner_1.0.safetensors``),
torch-free.

Names are converted by :mod:`sdjax.loading.ldm_names_xl`. The networks' configs come from the tensor shapes; what
shapes cannot tell follows the published stabilityai/stable-diffusion-xl-base-1.0 / -refiner-1.0 configs (64-dim
attention heads, CLIP ViT-L with quick_gelu and OpenCLIP bigG with gelu, the legacy ``eos_token_id`` 2, a
``force_upcast`` VAE with scaling factor 0.13025), and so do the scheduler (EulerDiscreteScheduler, shipped in
``sdjax/assets``), the built-in tokenizers (pad <|endoftext|> for ``tokenizer``, "!" for ``tokenizer_2``) and the
model_index options (base: ``force_zeros_for_empty_prompt``; refiner: ``requires_aesthetics_score``).

A file whose networks differ from the published ones in what shapes cannot tell (head counts, activations: tiny
test models, some research checkpoints) loads with ``config=`` a diffusers SDXL folder (configs and tokenizers, no
weights needed), as diffusers' ``from_single_file(..., config=...)``; the weights must fit its configs.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from sdjax import schedule, tokenizer, weights
from sdjax.errors import PipelineError
from sdjax.loading import Components, folders, ldm_names, ldm_names_xl, single_file
from sdjax.loading.ldm_names import State
from sdjax.weights import WeightsError

HEAD_DIM = 64  # every SDXL attention (UNet and both text encoders) has 64-dim heads
TIME_IDS = {"base": 6, "refiner": 5}  # original size, crop, target size (base) or aesthetic score (refiner)
VAE_SCALING_FACTOR = 0.13025
# model_index.json fields of the published base / refiner that sdjax reads.
OPTIONS = {
    "base": {"force_zeros_for_empty_prompt": True, "requires_aesthetics_score": False},
    "refiner": {"force_zeros_for_empty_prompt": False, "requires_aesthetics_score": True},
}
SCHEDULER_ASSET = "sdxl_scheduler_config.json"  # base and refiner publish the same file
_SPECIAL_TOKENS = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}  # as published (legacy eos 2)


def scheduler_config() -> dict[str, Any]:
    """The published SDXL ``scheduler/scheduler_config.json`` (EulerDiscreteScheduler), as a dict."""
    return json.loads(resources.files("sdjax").joinpath("assets", SCHEDULER_ASSET).read_text())


def read_keys(path: str | Path) -> list[str]:
    """The tensor names of a ``.safetensors`` file, from its header only (no tensor is read)."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            return list(f.keys())
    except (OSError, SafetensorError) as e:
        raise PipelineError(f"cannot read {path} as safetensors: {e}") from e


def file_family(path: str | Path) -> str:
    """ "sd" (SD 1.x / 2.x) or "sdxl" for a single-file ``.safetensors`` checkpoint, from its keys; PipelineError
    for other files (pickles, diffusers-format or LoRA files)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise PipelineError(f"{path}: single-file checkpoints are read as .safetensors only (got {path.suffix!r})")
    keys = read_keys(path)
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        raise PipelineError(
            f"{path} is neither an SD 1.x/2.x nor an SDXL single-file checkpoint: no model.diffusion_model.* UNet "
            f"(keys: {weights._short_list(sorted(keys), 3)}); diffusers-format weights load from a diffusers folder"
        )
    return "sdxl" if ldm_names_xl.is_sdxl(keys) else "sd"


# --- configs from shapes


def infer_configs(state: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """diffusers / transformers ``config.json`` dicts for the networks of a single-file SDXL state dict (LDM
    names; zero-stride ``np.broadcast_to`` views will do), and "scheduler": the published scheduler config."""
    parts = ldm_names_xl.split_components(state)
    return {
        **_infer_configs(ldm_names_xl.convert(parts), ldm_names_xl.variant_of(state)),
        "scheduler": scheduler_config(),
    }


def _infer_configs(components: dict[str, State], variant: str) -> dict[str, dict[str, Any]]:
    try:
        text_2 = _text_encoder_config(components["text_encoder_2"], projection=True)
        configs = {
            "unet": _unet_config(components["unet"], TIME_IDS[variant], text_2["projection_dim"]),
            "vae": {**single_file._vae_config(components["vae"], 1024), "scaling_factor": VAE_SCALING_FACTOR,
                    "force_upcast": True},
            "text_encoder_2": text_2,
        }  # fmt: skip
        if "text_encoder" in components:
            configs["text_encoder"] = _text_encoder_config(components["text_encoder"], projection=False)
    except KeyError as e:
        raise WeightsError(f"no weight for {e.args[0]}: not a complete SDXL {variant} network") from e
    return configs


def _heads(width: int) -> int:
    return max(1, width // HEAD_DIM)  # one head for toy widths under 64


def _depth(state: State, block: str) -> int:
    return len(ldm_names.indices(state, rf"{re.escape(block)}\.attentions\.0\.transformer_blocks\.(\d+)\."))


def _transformer_depths(state: State, blocks: int) -> int | list[int]:
    """``transformer_layers_per_block``: per down block, its Transformer2DModel depth (diffusers runs the up
    blocks in reverse and the mid block at the last depth); blocks without attention take 1, the last the mid
    block's. An int when every attention has the same depth."""
    mid = _depth(state, "mid_block")
    down = [_depth(state, f"down_blocks.{b}") for b in range(blocks)]
    up = [_depth(state, f"up_blocks.{blocks - 1 - b}") for b in range(blocks)]
    depths = [d or u or (mid if b == blocks - 1 else 1) for b, (d, u) in enumerate(zip(down, up, strict=True))]
    if any(u and u != d for u, d in zip(up, depths, strict=True)) or depths[-1] != mid:
        raise WeightsError(
            f"UNet transformer depths (down {down}, mid {mid}, up {up[::-1]}) are not one per resolution, mirrored "
            "in the up blocks, as SDXL's"
        )
    used = {d for d in (*down, *up, mid) if d}
    return used.pop() if len(used) == 1 else depths


def _unet_config(state: State, time_ids: int, pooled: int) -> dict[str, Any]:
    sd_layout = ldm_names.unet_layout_from_diffusers(state)
    blocks = sd_layout.blocks
    channels = [int(state[f"down_blocks.{b}.resnets.0.conv2.weight"].shape[0]) for b in range(blocks)]
    mid = "mid_block.attentions.0."
    embed_in = int(state["add_embedding.linear_1.weight"].shape[1])
    if (embed_in - pooled) % time_ids or embed_in <= pooled:
        raise WeightsError(
            f"add_embedding input width {embed_in} is not the pooled text width {pooled} plus {time_ids} time-id "
            "embeddings; the UNet and text encoder do not belong together"
        )
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 128,
        "in_channels": int(state["conv_in.weight"].shape[1]),
        "out_channels": int(state["conv_out.weight"].shape[0]),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in sd_layout.down_attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in sd_layout.up_attention],
        "block_out_channels": channels,
        "layers_per_block": sd_layout.layers,
        "cross_attention_dim": int(state[f"{mid}transformer_blocks.0.attn2.to_k.weight"].shape[1]),
        "transformer_layers_per_block": _transformer_depths(state, blocks),
        "attention_head_dim": [_heads(c) for c in channels],  # diffusers' name for the number of heads
        "use_linear_projection": state[f"{mid}proj_in.weight"].ndim == 2,
        "upcast_attention": None,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": (embed_in - pooled) // time_ids,
        "projection_class_embeddings_input_dim": embed_in,
        "norm_num_groups": single_file.NORM_NUM_GROUPS,
        "norm_eps": 1e-5,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "downsample_padding": 1,
    }


def _text_encoder_config(state: State, projection: bool) -> dict[str, Any]:
    config = {**single_file._text_encoder_config(state, open_clip=projection), **_SPECIAL_TOKENS}
    config["num_attention_heads"] = _heads(config["hidden_size"])
    if projection:  # OpenCLIP ViT-bigG: exact GELU, a projected pooled output
        config["architectures"] = ["CLIPTextModelWithProjection"]
        config["projection_dim"] = int(state["text_projection.weight"].shape[0])
    return config


# --- loading


def load(path: str | Path, dtype: Any = jnp.float32, config: str | Path | None = None) -> Components:
    """Loads a single-file SDXL base or refiner ``.safetensors`` checkpoint, without PyTorch.

    Args:
      path: the file.
      dtype: float32 / bfloat16 / float16 params and compute; a ``force_upcast`` VAE (SDXL's) stays float32.
      config: optional diffusers SDXL folder whose network configs, tokenizers, scheduler config and model_index
        options replace the published ones (weights are not read from it).
    Returns:
      Components (family "sdxl"): "unet", "vae", "text_encoder_2" and, for the base, "text_encoder".
    Raises:
      WeightsError / PipelineError: not SDXL, a network missing, weights that do not fit the configs (every
        missing / unexpected / mismatched key listed), a config folder of the other variant.
    """
    path = Path(path)
    parts = ldm_names_xl.split_components(weights.read_safetensors([path]))
    variant = _variant(parts)
    if "vae" not in parts:
        raise WeightsError(f"{path} lacks the VAE (first_stage_model.*); an SDXL single file holds every network")
    components = ldm_names_xl.convert(parts)
    if config is None:
        configs, extras = _infer_configs(components, variant), _published(variant)
    else:
        configs, extras = _folder(Path(config), set(components), path)
    dtypes = {}
    if jnp.dtype(dtype) != jnp.float32 and configs["vae"].get("force_upcast", True):
        dtypes["vae"] = jnp.float32  # SDXL's VAE overflows in 16 bits; diffusers decodes it in float32
    modules, params = single_file.build_networks(configs, components, dtype, path.name, dtypes)
    scheduler = extras["scheduler"]
    return Components(
        modules,
        params,
        extras["tokenizers"],
        schedule.ScheduleConfig.from_dict(scheduler),
        scheduler.get("_class_name", "EulerDiscreteScheduler"),
        "sdxl",
        extras["options"],
    )


def _variant(parts: Mapping[str, State]) -> str:
    return "base" if "text_encoder" in parts else "refiner"


def _published(variant: str) -> dict[str, Any]:
    tokenizers = {"tokenizer_2": tokenizer.clip_tokenizer(tokenizer.PAD_TOKENS["open_clip"])}
    if variant == "base":
        tokenizers = {"tokenizer": tokenizer.clip_tokenizer(tokenizer.PAD_TOKENS["clip"]), **tokenizers}
    return {"tokenizers": tokenizers, "scheduler": scheduler_config(), "options": dict(OPTIONS[variant])}


def _folder(folder: Path, networks: set[str], file: Path) -> tuple[dict[str, dict], dict[str, Any]]:
    """Configs and extras from a diffusers SDXL folder, which must describe the file's networks."""
    index = folders.read_model_index(folder, "sdxl")
    layout = folders.layout_of(index, folder)
    names = folders.present_networks(index, layout)
    if set(names) != networks:
        raise PipelineError(
            f"config folder {folder} describes {', '.join(sorted(names))} but {file.name} holds "
            f"{', '.join(sorted(networks))}: give the folder of the same SDXL variant (base or refiner)"
        )
    configs = {name: weights.read_component_config(folder / name)[1] for name in names}
    present = [name for name in layout.tokenizers if (index.get(name) or [None, None])[1] is not None]
    extras = {
        "tokenizers": {name: tokenizer.load_tokenizer(folder / name) for name in present},
        "scheduler": folders.read_scheduler_config(folder),
        "options": {key: index.get(key, default) for key, default in layout.options.items()},
    }
    return configs, extras


# --- writing


def save_single_file(pipe: Any, path: str | Path, dtype: Any = np.float16) -> Path:
    """Writes an SDXL pipeline's networks (``pipe.modules`` / ``pipe.params``, e.g. a ``StableDiffusionXL``) as
    one ``.safetensors`` file in the layout of sd_xl_base_1.0 (two text encoders) or sd_xl_refiner_1.0, weights
    stored as ``dtype`` (float16 as published, or float32); it is written beside ``path`` and renamed into place.
    Configs, tokenizers and scheduler are not stored: readers take the published ones (or a ``config`` folder)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise PipelineError(f"{path}: single files are written as .safetensors (got {path.suffix!r})")
    components = {
        name: weights.flax_to_torch(pipe.params[name], renames=getattr(module, "torch_export_renames", ()))
        for name, module in pipe.modules.items()
    }
    state = {
        k: np.asarray(jax.device_get(v)).astype(dtype) for k, v in ldm_names_xl.diffusers_to_ldm(components).items()
    }
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        save_file(state, staging, metadata={"format": "pt"})
        weights.follow_umask(staging)
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.remove(staging)
    return path
