"""ControlNet weights, torch-free: diffusers ``ControlNetModel`` folders and single ``.safetensors`` files.

Accepted:
  * a folder with ``config.json`` (``_class_name`` ControlNetModel) and ``diffusion_pytorch_model[.variant]
    .safetensors`` (or a sharded index), as diffusers writes and the Hub ships (lllyasviel/control_v11p_sd15_canny,
    diffusers/controlnet-canny-sdxl-1.0 ...);
  * a single file with diffusers' names (``controlnet_cond_embedding.*``, ``controlnet_down_blocks.N.*``, such as
    the diffusers_xl_* files of lllyasviel/sd_control_collection);
  * a single file with the original ControlNet code's (cldm) names, under ``control_model.`` or bare
    (``input_hint_block.*``, ``zero_convs.N.0.*``, ``middle_block_out.0.*`` plus the UNet encoder's LDM names:
    control_v11p_sd15_canny.safetensors, thibaud/controlnet-sd21; SDXL ones with ``label_emb.0.*``). Other keys
    of the file (a full cldm checkpoint's UNet, VAE, text encoder) are ignored.
A single file's config is read from its tensor shapes (blocks, widths, layers, attention placement and depths,
context width, control-image channels and embedding widths, SDXL's added embedding); what shapes cannot tell
follows the published ControlNets: 8 heads for SD 1.x (conv projections), 64-dim heads for SD 2.x / SDXL (linear
projections), no upcast attention, 256-wide time ids, no global pooling. ``config`` (a config.json or a folder
holding one) replaces the inferred config, e.g. for ControlNet 1.1 shuffle (``global_pool_conditions``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sdjax import weights
from sdjax.errors import PipelineError
from sdjax.loading import ldm_names, ldm_names_xl
from sdjax.loading.ldm_names import Pairs, State
from sdjax.models.controlnet import ControlNetConfig, ControlNetModel

CLASS_NAME = "ControlNetModel"
LDM_PREFIX = "control_model."
_DIFFUSERS_KEY = "controlnet_cond_embedding.conv_in.weight"
_LDM_KEY = "input_hint_block.0.weight"
# What the shapes cannot tell, as in the published ControlNets (see the module docstring).
SD1_ATTENTION_HEADS = 8
HEAD_DIM = 64
SDXL_TIME_EMBED_DIM = 256
NORM_NUM_GROUPS = 32
ACCEPTED = (
    "a diffusers ControlNetModel folder (config.json + diffusion_pytorch_model.safetensors) or a .safetensors "
    "file with diffusers' or the original ControlNet's (control_model.*) names"
)


def load_controlnet(
    path: str | os.PathLike, dtype: Any, variant: str | None = None, config: str | os.PathLike | None = None
) -> tuple[ControlNetModel, weights.Params]:
    """(module computing in ``dtype``, params cast to ``dtype``) of the ControlNet at ``path`` (see the module
    docstring for what is accepted). PipelineError for a path that is not a ControlNet; WeightsError (one line,
    listing every missing / unexpected / mismatched key) for weights that do not fit the config."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"ControlNet path {path} does not exist; expected {ACCEPTED}")
    if path.is_dir():
        if config is not None:
            raise PipelineError(f"config= is read for single-file ControlNets only; {path} is a folder")
        return _from_folder(path, dtype, variant)
    return _from_file(path, dtype, config)


def _from_folder(folder: Path, dtype: Any, variant: str | None) -> tuple[ControlNetModel, weights.Params]:
    if not (folder / "config.json").is_file() and (folder / "model_index.json").is_file():
        index = weights.read_json(folder / "model_index.json")
        inside = f"; its ControlNet is {folder / 'controlnet'}" if "controlnet" in index else ""
        raise PipelineError(f"{folder} is a {index.get('_class_name')!r} pipeline folder, not a ControlNet{inside}")
    class_name, _ = weights.read_component_config(folder)
    if class_name != CLASS_NAME:
        raise PipelineError(f"{folder / 'config.json'} describes a {class_name!r}, not a ControlNet ({CLASS_NAME})")
    return weights.load_component(folder, dtype, variant)


def _from_file(file: Path, dtype: Any, config: str | os.PathLike | None) -> tuple[ControlNetModel, weights.Params]:
    if file.suffix != ".safetensors":
        raise PipelineError(f"{file}: ControlNet files are read as .safetensors only (PyTorch pickles are not read)")
    state = to_diffusers_names(weights.read_safetensors([file]), file.name)
    config_dict = _read_config(config) if config is not None else infer_config(state)
    try:
        module = ControlNetModel(ControlNetConfig.from_dict(config_dict), dtype=dtype)
    except (TypeError, ValueError) as e:
        raise type(e)(f"ControlNet config for {file.name}: {e}") from e
    where = f"{CLASS_NAME} ({file})"
    params = weights.torch_to_flax(state, weights.param_shapes(module), component=where)
    return module, weights.to_device(params, dtype, component=where)


def _read_config(config: str | os.PathLike) -> dict[str, Any]:
    path = Path(config)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise PipelineError(f"ControlNet config {config} is neither a config.json file nor a folder holding one")
    values = weights.read_json(path)
    if values.get("_class_name", CLASS_NAME) != CLASS_NAME:
        raise PipelineError(f"{path} describes a {values['_class_name']!r}, not a ControlNet ({CLASS_NAME})")
    return values


# --- names


def to_diffusers_names(state: Mapping[str, Any], where: str = "file") -> State:
    """A ControlNet state dict in diffusers' names: as it is, or renamed from the original ControlNet names
    (``control_model.`` prefix or bare). PipelineError when the keys are no ControlNet's."""
    if _DIFFUSERS_KEY in state:
        return dict(state)
    if LDM_PREFIX + _LDM_KEY in state:
        return ldm_to_diffusers({k[len(LDM_PREFIX) :]: v for k, v in state.items() if k.startswith(LDM_PREFIX)})
    if _LDM_KEY in state:
        return ldm_to_diffusers(state)
    if "lora_controlnet" in state:
        raise PipelineError(f"{where} is a Control-LoRA (lora_controlnet); only full ControlNets are supported")
    kind = " (a Stable Diffusion checkpoint)" if any(k.startswith("model.diffusion_model.") for k in state) else ""
    raise PipelineError(
        f"{where} is not a ControlNet{kind}: it has no {_DIFFUSERS_KEY} (diffusers names) or "
        f"{LDM_PREFIX}{_LDM_KEY} (original names); keys: {weights._short_list(sorted(state), 3)}"
    )


def _hint_pairs(convs: int) -> Pairs:
    """The control-image embedding: LDM's ``input_hint_block`` is Sequential(conv, SiLU, conv, SiLU, ...), the
    convs at even indices; diffusers splits it into conv_in, blocks.N and conv_out."""
    names = ["conv_in", *(f"blocks.{i}" for i in range(convs - 2)), "conv_out"]
    return [(f"input_hint_block.{2 * i}.", f"controlnet_cond_embedding.{name}.") for i, name in enumerate(names)]


def _controlnet_pairs(layout: Any, hint_convs: int, skips: int) -> Pairs:
    return [
        *ldm_names_xl._unet_pairs(layout),  # the encoder half's names (and SDXL's label_emb -> add_embedding)
        *_hint_pairs(hint_convs),
        *((f"zero_convs.{i}.0.", f"controlnet_down_blocks.{i}.") for i in range(skips)),
        ("middle_block_out.0.", "controlnet_mid_block."),
    ]


def ldm_to_diffusers(state: Mapping[str, Any]) -> State:
    """An original-names ControlNet state dict (``control_model.`` removed) in diffusers ``ControlNetModel``
    names; WeightsError listing the keys that fit neither."""
    layout = ldm_names.unet_layout_from_ldm(state)
    hint = len(ldm_names.indices(state, r"input_hint_block\.(\d+)\.weight$"))
    skips = len(ldm_names.indices(state, r"zero_convs\.(\d+)\.0\.weight$"))
    return ldm_names._rename(state, _controlnet_pairs(layout, hint, skips), "ControlNet (control_model)", "ControlNet")


def diffusers_to_ldm(state: Mapping[str, Any]) -> State:
    """Inverse of :func:`ldm_to_diffusers`: a diffusers ControlNet state dict in the original names (unprefixed)."""
    layout = ldm_names.unet_layout_from_diffusers(state)
    hint = 2 + len(ldm_names.indices(state, r"controlnet_cond_embedding\.blocks\.(\d+)\.weight$"))
    skips = len(ldm_names.indices(state, r"controlnet_down_blocks\.(\d+)\.weight$"))
    pairs = ldm_names._inverse(_controlnet_pairs(layout, hint, skips))
    return ldm_names._rename(state, pairs, "diffusers ControlNetModel", "ControlNet")


# --- config from shapes


def infer_config(state: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers ControlNetModel ``config.json`` dict read from a diffusers-named state dict's shapes (see the
    module docstring for what follows the published ControlNets instead)."""
    try:
        return _infer_config(state)
    except KeyError as e:
        raise weights.WeightsError(f"no weight for {e.args[0]}: not a complete ControlNet") from e


def _infer_config(state: Mapping[str, Any]) -> dict[str, Any]:
    layout = ldm_names.unet_layout_from_diffusers(state)
    channels = [int(state[f"down_blocks.{b}.resnets.0.conv2.weight"].shape[0]) for b in range(layout.blocks)]
    mid = "mid_block.attentions.0."
    linear = state[f"{mid}proj_in.weight"].ndim == 2
    config = {
        "_class_name": CLASS_NAME,
        "in_channels": int(state["conv_in.weight"].shape[1]),
        "conditioning_channels": int(state[_DIFFUSERS_KEY].shape[1]),
        "conditioning_embedding_out_channels": _embedding_widths(state),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in layout.down_attention],
        "block_out_channels": channels,
        "layers_per_block": layout.layers,
        "cross_attention_dim": int(state[f"{mid}transformer_blocks.0.attn2.to_k.weight"].shape[1]),
        "transformer_layers_per_block": _transformer_depths(state, layout),
        # diffusers' attention_head_dim is the number of heads (a historical misnaming).
        "attention_head_dim": [c // HEAD_DIM for c in channels] if linear else SD1_ATTENTION_HEADS,
        "use_linear_projection": linear,
        "norm_num_groups": NORM_NUM_GROUPS,
    }
    if "add_embedding.linear_1.weight" in state:
        config["addition_embed_type"] = "text_time"
        config["addition_time_embed_dim"] = SDXL_TIME_EMBED_DIM
        config["projection_class_embeddings_input_dim"] = int(state["add_embedding.linear_1.weight"].shape[1])
    return config


def _embedding_widths(state: Mapping[str, Any]) -> list[int]:
    strided = ldm_names.indices(state, r"controlnet_cond_embedding\.blocks\.(\d+)\.weight$")[1::2]
    return [int(state[_DIFFUSERS_KEY].shape[0])] + [
        int(state[f"controlnet_cond_embedding.blocks.{i}.weight"].shape[0]) for i in strided
    ]


def _transformer_depths(state: Mapping[str, Any], layout: Any) -> int | list[int]:
    """BasicTransformerBlocks per down block (its first layer's), the mid block's for a last block without
    attention (diffusers gives the mid block the last entry); 1 where no block reads it."""
    count = lambda prefix: len(ldm_names.indices(state, rf"{prefix}\.transformer_blocks\.(\d+)\."))
    depths = [count(f"down_blocks\\.{b}\\.attentions\\.0") if a else 1 for b, a in enumerate(layout.down_attention)]
    if not layout.down_attention[-1]:
        depths[-1] = count("mid_block\\.attentions\\.0")
    return depths[0] if len(set(depths)) == 1 else depths
