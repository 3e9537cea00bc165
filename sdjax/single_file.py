"""Original (CompVis / LDM) single-file Stable Diffusion 1.x / 2.x checkpoints, torch-free.

A single file (``v1-5-pruned-emaonly.safetensors``, ``v2-1_768-ema-pruned.safetensors``) holds the three networks
under the names of the original latent-diffusion code:

  ``model.diffusion_model.*``         UNet: input_blocks / middle_block / output_blocks, time_embed, out
  ``first_stage_model.*``             VAE: encoder / decoder with down / up / mid blocks, 1x1-conv attention
  ``cond_stage_model.transformer.*``  SD 1.x text encoder (Hugging Face CLIP names under ``text_model.``)
  ``cond_stage_model.model.*``        SD 2.x text encoder (OpenCLIP: fused qkv, ``transformer.resblocks.N``)

Conversion to and from the diffusers / transformers names is a rename through a table of (LDM prefix, diffusers
prefix) pairs generated from the block layout, plus the few structural differences that a rename cannot express
(1x1 convs vs linear layers in the VAE attention, OpenCLIP's fused qkv, SD 2's penultimate text layer). This is
the mapping of diffusers' ``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint`` and
``convert_open_clip_checkpoint``. Configs are read from the tensor shapes; what shapes cannot tell (head counts,
norm groups, v-prediction) follows the published SD 1.x / 2.x configs.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from sdjax import weights
from sdjax.predictions import PREDICTION_TYPES
from sdjax.weights import WeightsError

State = dict[str, np.ndarray]
Pairs = list[tuple[str, str]]  # (LDM key prefix, diffusers key prefix); a prefix without a trailing "." is a key

PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "clip": "cond_stage_model.transformer.",
    "open_clip": "cond_stage_model.model.",
}
# Not parameters of the inference networks: the VAE's training discriminator (unpruned files) and, in OpenCLIP,
# the contrastive-loss temperature and the pooled-output projection that SD never uses.
IGNORED = {"vae": ("loss.",), "open_clip": ("logit_scale", "text_projection", "visual.")}

# What the weights cannot tell, as in the published configs: SD 1.x uses 8 heads per attention, SD 2.x 64-dim
# heads; both text encoders have 64-dim heads; every norm has 32 groups.
SD1_ATTENTION_HEADS = 8
SD2_ATTENTION_HEAD_DIM = 64
CLIP_HEAD_DIM = 64
NORM_NUM_GROUPS = 32
VAE_SCALING_FACTOR = 0.18215

# scheduler/scheduler_config.json as published (diffusers 0.6 / 0.8 / 0.10 wrote them: no timestep_spacing, so
# each sampler takes its diffusers class default). A single file is read with the config of the repository
# diffusers' from_single_file takes for it: SD 1.x -> stable-diffusion-v1-5; SD 2.x -> stable-diffusion-2-1
# (768-v) for v-prediction, stable-diffusion-2-1-base for epsilon.
_PUBLISHED_SCHEDULER = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
SCHEDULER_CONFIGS: dict[str, dict[str, Any]] = {
    "sd15": {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", **_PUBLISHED_SCHEDULER},
    "sd21": {
        "_class_name": "DDIMScheduler",
        "_diffusers_version": "0.8.0",
        **_PUBLISHED_SCHEDULER,
        "prediction_type": "v_prediction",
    },
    "sd21_base": {
        "_class_name": "PNDMScheduler",
        "_diffusers_version": "0.10.0.dev0",
        **_PUBLISHED_SCHEDULER,
        "prediction_type": "epsilon",
    },
}
SCHEDULER_CONFIG = SCHEDULER_CONFIGS["sd15"]  # kept for callers of earlier versions


def scheduler_config(sd2: bool, prediction_type: str | None) -> dict[str, Any]:
    """The published scheduler config for an SD 1.x / 2.x single file; ``prediction_type`` (None: the
    published one, epsilon for SD 1.x) is written into it."""
    if not sd2:
        config = dict(SCHEDULER_CONFIGS["sd15"])
    else:
        config = dict(SCHEDULER_CONFIGS["sd21" if prediction_type == "v_prediction" else "sd21_base"])
    if prediction_type is not None:
        config["prediction_type"] = prediction_type
    return config


def default_tokenizer(text_encoder_config: Any) -> Any:
    """The built-in CLIP tokenizer a single file's text encoder was trained with: OpenAI CLIP ViT-L (SD 1.x,
    quick_gelu) pads with <|endoftext|>, OpenCLIP ViT-H (SD 2.x, gelu) with "!", as the published folders."""
    from sdjax import tokenizer

    open_clip = text_encoder_config.hidden_act == "gelu"
    return tokenizer.clip_tokenizer(tokenizer.PAD_TOKENS["open_clip" if open_clip else "clip"])


_UNET_RESNET = (
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("emb_layers.1.", "time_emb_proj."),
    ("skip_connection.", "conv_shortcut."),
)
_VAE_RESNET = (
    ("norm1.", "norm1."),
    ("conv1.", "conv1."),
    ("norm2.", "norm2."),
    ("conv2.", "conv2."),
    ("nin_shortcut.", "conv_shortcut."),
)
_VAE_ATTENTION = (
    ("norm.", "group_norm."),
    ("q.", "to_q."),
    ("k.", "to_k."),
    ("v.", "to_v."),
    ("proj_out.", "to_out.0."),
)
_OPEN_CLIP_LAYER = (
    ("ln_1.", "layer_norm1."),
    ("ln_2.", "layer_norm2."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
    ("attn.out_proj.", "self_attn.out_proj."),
    # Fused q/k/v, renamed here and split in _split_qkv.
    ("attn.in_proj_weight", "self_attn.in_proj.weight"),
    ("attn.in_proj_bias", "self_attn.in_proj.bias"),
)
_VAE_LINEAR_ATTENTION = re.compile(r"(en|de)coder\.mid_block\.attentions\.0\.to_(q|k|v|out\.0)\.weight")
# diffusers < 0.15 names of the VAE attention projections.
_LEGACY_VAE_NAMES = (("query.", "to_q."), ("key.", "to_k."), ("value.", "to_v."), ("proj_attn.", "to_out.0."))


@dataclasses.dataclass(frozen=True)
class _UNetLayout:
    """Block structure of an SD UNet: ``blocks`` resolutions with ``layers`` ResNets per down block (one more
    per up block), and whether each down / up block (diffusers order) has cross-attention."""

    blocks: int
    layers: int
    down_attention: tuple[bool, ...]
    up_attention: tuple[bool, ...]


# --- renaming tables


def _with(ldm: str, diffusers: str, names: tuple[tuple[str, str], ...]) -> Pairs:
    return [(ldm + a, diffusers + b) for a, b in names]


def _unet_pairs(layout: _UNetLayout) -> Pairs:
    pairs = [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
        *_with("middle_block.0.", "mid_block.resnets.0.", _UNET_RESNET),
        ("middle_block.1.", "mid_block.attentions.0."),
        *_with("middle_block.2.", "mid_block.resnets.1.", _UNET_RESNET),
    ]
    # LDM numbers every layer of the UNet in one sequence; a down block is `layers` ResNet(+attention) layers
    # followed by one downsampling layer, an up block `layers + 1` layers with the upsampler in the last.
    per_block, last = layout.layers + 1, layout.blocks - 1
    for b in range(layout.blocks):
        for j in range(layout.layers):
            i = 1 + b * per_block + j
            pairs += _with(f"input_blocks.{i}.0.", f"down_blocks.{b}.resnets.{j}.", _UNET_RESNET)
            if layout.down_attention[b]:
                pairs.append((f"input_blocks.{i}.1.", f"down_blocks.{b}.attentions.{j}."))
        if b < last:
            pairs.append((f"input_blocks.{(b + 1) * per_block}.0.op.", f"down_blocks.{b}.downsamplers.0.conv."))
        for j in range(per_block):
            i = b * per_block + j
            pairs += _with(f"output_blocks.{i}.0.", f"up_blocks.{b}.resnets.{j}.", _UNET_RESNET)
            if layout.up_attention[b]:
                pairs.append((f"output_blocks.{i}.1.", f"up_blocks.{b}.attentions.{j}."))
        if b < last:
            upsampler = 2 if layout.up_attention[b] else 1
            pairs.append(
                (
                    f"output_blocks.{b * per_block + layout.layers}.{upsampler}.conv.",
                    f"up_blocks.{b}.upsamplers.0.conv.",
                )
            )
    return pairs


def _vae_pairs(blocks: int, layers: int) -> Pairs:
    pairs = [("quant_conv.", "quant_conv."), ("post_quant_conv.", "post_quant_conv.")]
    for part in ("encoder", "decoder"):
        pairs += [
            (f"{part}.conv_in.", f"{part}.conv_in."),
            (f"{part}.conv_out.", f"{part}.conv_out."),
            (f"{part}.norm_out.", f"{part}.conv_norm_out."),
            *_with(f"{part}.mid.block_1.", f"{part}.mid_block.resnets.0.", _VAE_RESNET),
            *_with(f"{part}.mid.attn_1.", f"{part}.mid_block.attentions.0.", _VAE_ATTENTION),
            *_with(f"{part}.mid.block_2.", f"{part}.mid_block.resnets.1.", _VAE_RESNET),
        ]
    for i in range(blocks):
        up = blocks - 1 - i  # LDM numbers decoder blocks from the lowest resolution up, diffusers in call order
        for j in range(layers):
            pairs += _with(f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.", _VAE_RESNET)
        for j in range(layers + 1):
            pairs += _with(f"decoder.up.{i}.block.{j}.", f"decoder.up_blocks.{up}.resnets.{j}.", _VAE_RESNET)
        if i < blocks - 1:
            pairs.append((f"encoder.down.{i}.downsample.conv.", f"encoder.down_blocks.{i}.downsamplers.0.conv."))
        if i > 0:
            pairs.append((f"decoder.up.{i}.upsample.conv.", f"decoder.up_blocks.{up}.upsamplers.0.conv."))
    return pairs


def _clip_pairs() -> Pairs:
    return [("text_model.", "text_model.")]


def _open_clip_pairs(layers: int) -> Pairs:
    pairs = [
        ("token_embedding.", "text_model.embeddings.token_embedding."),
        ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
        ("ln_final.", "text_model.final_layer_norm."),
    ]
    for i in range(layers):
        pairs += _with(f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}.", _OPEN_CLIP_LAYER)
    return pairs


# --- layouts read from the keys


def _indices(keys: Any, pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := regex.match(k))})


def _unet_layout_from_ldm(state: Mapping[str, Any]) -> _UNetLayout:
    blocks = len(_indices(state, r"input_blocks\.(\d+)\.0\.op\.weight$")) + 1
    inputs = _indices(state, r"input_blocks\.(\d+)\.")
    if not inputs or len(inputs) % blocks or len(inputs) // blocks < 2 or inputs[-1] + 1 != len(inputs):
        raise WeightsError(
            f"model.diffusion_model.input_blocks.* ({len(inputs)} layers, {blocks - 1} downsamplers) do not form "
            f"{blocks} down blocks of equal depth; expected an SD 1.x/2.x UNet"
        )
    layers = len(inputs) // blocks - 1
    return _UNetLayout(
        blocks,
        layers,
        tuple(f"input_blocks.{1 + b * (layers + 1)}.1.proj_in.weight" in state for b in range(blocks)),
        tuple(f"output_blocks.{b * (layers + 1)}.1.proj_in.weight" in state for b in range(blocks)),
    )


def _unet_layout_from_diffusers(state: Mapping[str, Any]) -> _UNetLayout:
    blocks = len(_indices(state, r"down_blocks\.(\d+)\."))
    return _UNetLayout(
        blocks,
        len(_indices(state, r"down_blocks\.0\.resnets\.(\d+)\.")),
        tuple(f"down_blocks.{b}.attentions.0.proj_in.weight" in state for b in range(blocks)),
        tuple(f"up_blocks.{b}.attentions.0.proj_in.weight" in state for b in range(blocks)),
    )


def _vae_layout(state: Mapping[str, Any], down: str, block: str) -> tuple[int, int]:
    """(blocks, ResNets per encoder block) from keys ``encoder.<down>.N.<block>.M.*``."""
    return (
        len(_indices(state, rf"encoder\.{down}\.(\d+)\.")),
        len(_indices(state, rf"encoder\.{down}\.0\.{block}\.(\d+)\.")),
    )


# --- renaming engine


def _rename(state: Mapping[str, np.ndarray], pairs: Pairs, what: str) -> State:
    """Replaces each key's longest matching prefix; keys no prefix matches are all reported in one error."""
    table = dict(pairs)
    out, unknown = {}, []
    for key, value in state.items():
        parts = key.split(".")
        candidates = (".".join(parts[:j]) + ("." if j < len(parts) else "") for j in range(len(parts), 0, -1))
        prefix = next((c for c in candidates if c in table), None)
        if prefix is None:
            unknown.append(key)
            continue
        out[table[prefix] + key[len(prefix) :]] = value
    if unknown:
        raise WeightsError(
            f"{what}: {len(unknown)} keys do not fit the SD 1.x/2.x layout ({weights._short_list(sorted(unknown))})"
        )
    return out


def _inverse(pairs: Pairs) -> Pairs:
    return [(diffusers, ldm) for ldm, diffusers in pairs]


def _strip(state: Mapping[str, np.ndarray], prefixes: tuple[str, ...]) -> State:
    return {k: v for k, v in state.items() if not k.startswith(prefixes)}


# --- structural differences


def _split_qkv(state: State) -> State:
    out = {}
    for key, value in state.items():
        head, fused, leaf = key.rpartition("self_attn.in_proj.")
        if not fused:
            out[key] = value
            continue
        for name, part in zip("qkv", np.split(value, 3, axis=0), strict=True):
            out[f"{head}self_attn.{name}_proj.{leaf}"] = part
    return out


def _fuse_qkv(state: State) -> State:
    out = {}
    for key, value in state.items():
        match = re.fullmatch(r"(.*)self_attn\.([qkv])_proj\.(weight|bias)", key)
        if match is None:
            out[key] = value
        elif match.group(2) == "q":
            head, leaf = match.group(1), match.group(3)
            parts = [state[f"{head}self_attn.{n}_proj.{leaf}"] for n in "qkv"]
            out[f"{head}self_attn.in_proj.{leaf}"] = np.concatenate(parts, axis=0)
    return out


def _vae_attention_to_linear(state: State) -> State:
    # LDM's VAE attention projections are 1x1 convs (out, in, 1, 1); diffusers' are linear (out, in).
    is_conv = lambda k, v: _VAE_LINEAR_ATTENTION.fullmatch(k) and v.ndim == 4
    return {k: v[:, :, 0, 0] if is_conv(k, v) else v for k, v in state.items()}


def _vae_attention_to_conv(state: State) -> State:
    is_linear = lambda k, v: _VAE_LINEAR_ATTENTION.fullmatch(k) and v.ndim == 2
    return {k: v[:, :, None, None] if is_linear(k, v) else v for k, v in state.items()}


def _identity_layer(state: State, index: int) -> State:
    """An all-zero text layer: LayerNorm(x) * 0 feeds zero q/k/v and MLP inputs, so the layer returns its input."""
    source, target = "text_model.encoder.layers.0.", f"text_model.encoder.layers.{index}."
    return {target + k[len(source) :]: np.zeros_like(v) for k, v in state.items() if k.startswith(source)}


# --- whole files


def _split_components(state: Mapping[str, np.ndarray]) -> dict[str, State]:
    """{"unet" | "vae" | "clip" | "open_clip": state without its prefix} for the networks present."""
    if any(k.startswith("conditioner.embedders.") for k in state):
        raise WeightsError(
            "this is an SDXL checkpoint (conditioner.embedders.* keys); SDXL is not supported, only SD 1.x/2.x "
            "single files (model.diffusion_model.*, first_stage_model.*, cond_stage_model.*)"
        )
    parts = {name: {k[len(p) :]: v for k, v in state.items() if k.startswith(p)} for name, p in PREFIXES.items()}
    parts = {name: _strip(part, IGNORED.get(name, ())) for name, part in parts.items() if part}
    if "unet" not in parts:
        sample = weights._short_list(sorted(state), 3)
        raise WeightsError(
            f"not an original (LDM) SD 1.x/2.x checkpoint: no model.diffusion_model.* UNet keys (keys: {sample}); "
            "diffusers-format weights load from a diffusers folder instead"
        )
    if any(k.startswith("label_emb.") for k in parts["unet"]):
        raise WeightsError(
            "the UNet has label_emb.* (class / image-size conditioning: SDXL, unCLIP or the x4 upscaler); only SD "
            "1.x/2.x text-to-image and inpainting UNets are supported"
        )
    return parts


def _convert(parts: dict[str, State]) -> dict[str, State]:
    unet = parts["unet"]
    out = {"unet": _rename(unet, _unet_pairs(_unet_layout_from_ldm(unet)), "model.diffusion_model")}
    if "vae" in parts:
        pairs = _vae_pairs(*_vae_layout(parts["vae"], "down", "block"))
        out["vae"] = _vae_attention_to_linear(_rename(parts["vae"], pairs, "first_stage_model"))
    if "clip" in parts:
        # Files saved with transformers < 4.19 lack the text_model. level.
        state = {
            re.sub(r"^(embeddings|encoder|final_layer_norm)\.", r"text_model.\1.", k): v
            for k, v in parts["clip"].items()
        }
        out["text_encoder"] = _rename(state, _clip_pairs(), "cond_stage_model.transformer")
    elif "open_clip" in parts:
        # SD 2 conditions on the penultimate layer's output (then ln_final): the last layer is never run.
        last = len(_indices(parts["open_clip"], r"transformer\.resblocks\.(\d+)\.")) - 1
        state = _strip(parts["open_clip"], (f"transformer.resblocks.{last}.",))
        out["text_encoder"] = _split_qkv(_rename(state, _open_clip_pairs(last), "cond_stage_model.model"))
    return out


def ldm_to_diffusers(state: Mapping[str, np.ndarray]) -> dict[str, State]:
    """Splits a single-file SD 1.x / 2.x state dict into diffusers / transformers state dicts.

    Args:
      state: LDM key -> array (PyTorch layouts, any dtype), e.g. from :func:`sdjax.weights.read_safetensors`.
        Keys outside the three networks (noise-schedule buffers, ``model_ema.*``) are ignored.
    Returns:
      {"unet": UNet2DConditionModel keys, "vae": AutoencoderKL keys, "text_encoder": CLIPTextModel keys (with
      the ``text_model.`` prefix)} for the networks present; arrays keep their dtype (slices, not copies).
      The SD 2 OpenCLIP encoder loses its last layer (SD 2 uses the penultimate one), as in diffusers.
    Raises:
      WeightsError: SDXL or non-LDM files, and keys that do not fit the SD layout (all listed).
    """
    return _convert(_split_components(state))


def diffusers_to_ldm(components: Mapping[str, Mapping[str, np.ndarray]], open_clip: bool | None = None) -> State:
    """Joins diffusers / transformers state dicts into one single-file (LDM) state dict, as A1111 / ComfyUI read.

    Args:
      components: any of {"unet", "vae", "text_encoder"} -> PyTorch state dict (numpy arrays, PyTorch layouts);
        text encoder keys with or without ``text_model.``; legacy VAE attention names are accepted.
      open_clip: write the text encoder as SD 2's OpenCLIP (``cond_stage_model.model.*``) rather than SD 1's
        ``cond_stage_model.transformer.*``. None: OpenCLIP iff the UNet has linear (2-D) ``proj_in`` (SD 2).
    Returns:
      LDM key -> array. OpenCLIP gets one extra all-zero last layer (an identity; it stands in for the layer SD 2
      skips) and an identity ``text_projection``, so that LDM code and diffusers' converter both load the file.
    """
    unknown = sorted(set(components) - {"unet", "vae", "text_encoder"})
    if unknown:
        raise WeightsError(f"diffusers_to_ldm: unknown components {unknown}; accepted: unet, vae, text_encoder")
    out: State = {}
    unet = dict(components.get("unet", {}))
    if unet:
        pairs = _inverse(_unet_pairs(_unet_layout_from_diffusers(unet)))
        out.update(_prefixed("unet", _rename(unet, pairs, "diffusers UNet")))
    vae = {_legacy_vae_name(k): v for k, v in components.get("vae", {}).items()}
    if vae:
        pairs = _inverse(_vae_pairs(*_vae_layout(vae, "down_blocks", "resnets")))
        out.update(_prefixed("vae", _rename(_vae_attention_to_conv(vae), pairs, "diffusers AutoencoderKL")))
    text = {
        k if k.startswith("text_model.") else f"text_model.{k}": v
        for k, v in components.get("text_encoder", {}).items()
    }
    if text:
        if open_clip is None:
            open_clip = np.ndim(unet.get("mid_block.attentions.0.proj_in.weight")) == 2
        out.update(_open_clip_to_ldm(text) if open_clip else _clip_to_ldm(text))
    return out


def _clip_to_ldm(state: State) -> State:
    return _prefixed("clip", _rename(state, _clip_pairs(), "transformers CLIPTextModel"))


def _open_clip_to_ldm(state: State) -> State:
    layers = len(_indices(state, r"text_model\.encoder\.layers\.(\d+)\."))
    state = _fuse_qkv({**state, **_identity_layer(state, layers)})
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}  # a buffer OpenCLIP does not have
    ldm = _rename(state, _inverse(_open_clip_pairs(layers + 1)), "transformers CLIPTextModel")
    embedding = ldm["token_embedding.weight"]
    ldm["text_projection"] = np.eye(embedding.shape[1], dtype=embedding.dtype)
    return _prefixed("open_clip", ldm)


def _prefixed(component: str, state: State) -> State:
    return {PREFIXES[component] + k: v for k, v in state.items()}


def _legacy_vae_name(key: str) -> str:
    for old, new in _LEGACY_VAE_NAMES:
        key = re.sub(rf"(attentions\.\d+\.){re.escape(old)}", rf"\g<1>{new}", key)
    return key


# --- configs


def infer_configs(state: Mapping[str, Any], prediction_type: str | None = None) -> dict[str, dict[str, Any]]:
    """diffusers / transformers ``config.json`` dicts for the networks of a single-file SD 1.x / 2.x state dict.

    Structure (blocks, channels, layers, attention placement, context and text dims, inpainting's 9 input
    channels) comes from the tensor shapes; the rest follows the published configs: SD 1.x (conv ``proj_in``)
    has 8 heads, SD 2.x (linear ``proj_in``) 64-dim heads, and ``upcast_attention`` and 768-pixel sample sizes
    for SD 2.x v-prediction models. v-prediction cannot be read from weights, hence ``prediction_type``.

    Args:
      state: LDM key -> numpy array (for shapes only, zero-stride ``np.broadcast_to`` views will do).
      prediction_type: "epsilon" | "v_prediction" | "sample" for the scheduler config; None: epsilon.
    Returns:
      {"unet", "vae", "text_encoder" (the networks present), "scheduler": the published scheduler config
      of the family (:func:`scheduler_config`)}.
    """
    parts = _split_components(state)
    return _infer_configs(_convert(parts), "open_clip" in parts, prediction_type)


def _infer_configs(components: dict[str, State], open_clip: bool, prediction_type: str | None) -> dict[str, dict]:
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r} is not accepted; use one of {PREDICTION_TYPES}")
    try:
        unet = components["unet"]
        sd2 = unet["mid_block.attentions.0.proj_in.weight"].ndim == 2
        is_768_v = sd2 and prediction_type == "v_prediction"  # SD 2.x 768-v: upcast attention, 768-pixel images
        configs = {"unet": _unet_config(unet, sd2, is_768_v)}
        if "vae" in components:
            configs["vae"] = _vae_config(components["vae"], sample_size=768 if is_768_v else 512)
        if "text_encoder" in components:
            configs["text_encoder"] = _text_encoder_config(components["text_encoder"], open_clip)
    except KeyError as e:
        raise WeightsError(f"no weight for {e.args[0]}: not a complete SD 1.x/2.x network") from e
    return {**configs, "scheduler": scheduler_config(sd2, prediction_type)}


def _unet_config(state: State, sd2: bool, is_768_v: bool) -> dict[str, Any]:
    layout = _unet_layout_from_diffusers(state)
    channels = [int(state[f"down_blocks.{b}.resnets.0.conv2.weight"].shape[0]) for b in range(layout.blocks)]
    mid = "mid_block.attentions.0."
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 96 if is_768_v else 64,
        "in_channels": int(state["conv_in.weight"].shape[1]),
        "out_channels": int(state["conv_out.weight"].shape[0]),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in layout.down_attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in layout.up_attention],
        "block_out_channels": channels,
        "layers_per_block": layout.layers,
        "cross_attention_dim": int(state[f"{mid}transformer_blocks.0.attn2.to_k.weight"].shape[1]),
        "transformer_layers_per_block": len(_indices(state, rf"{re.escape(mid)}transformer_blocks\.(\d+)\.")),
        # diffusers' attention_head_dim is the number of heads (a historical misnaming).
        "attention_head_dim": [c // SD2_ATTENTION_HEAD_DIM for c in channels] if sd2 else SD1_ATTENTION_HEADS,
        "use_linear_projection": sd2,
        "upcast_attention": is_768_v,
        "norm_num_groups": NORM_NUM_GROUPS,
        "norm_eps": 1e-5,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "downsample_padding": 1,
    }


def _vae_config(state: State, sample_size: int) -> dict[str, Any]:
    blocks, layers = _vae_layout(state, "down_blocks", "resnets")
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": int(state["encoder.conv_in.weight"].shape[1]),
        "out_channels": int(state["decoder.conv_out.weight"].shape[0]),
        "down_block_types": ["DownEncoderBlock2D"] * blocks,
        "up_block_types": ["UpDecoderBlock2D"] * blocks,
        "block_out_channels": [
            int(state[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0]) for i in range(blocks)
        ],
        "layers_per_block": layers,
        "latent_channels": int(state["decoder.conv_in.weight"].shape[1]),
        "norm_num_groups": NORM_NUM_GROUPS,
        "sample_size": sample_size,
        "scaling_factor": VAE_SCALING_FACTOR,
        "use_quant_conv": "quant_conv.weight" in state,
        "use_post_quant_conv": "post_quant_conv.weight" in state,
        "mid_block_add_attention": "encoder.mid_block.attentions.0.to_q.weight" in state,
    }


def _text_encoder_config(state: State, open_clip: bool) -> dict[str, Any]:
    vocab_size, hidden_size = state["text_model.embeddings.token_embedding.weight"].shape
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": int(vocab_size),
        "hidden_size": int(hidden_size),
        "intermediate_size": int(state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
        "projection_dim": int(hidden_size),
        "num_hidden_layers": len(_indices(state, r"text_model\.encoder\.layers\.(\d+)\.")),
        "num_attention_heads": int(hidden_size) // CLIP_HEAD_DIM,
        "max_position_embeddings": int(state["text_model.embeddings.position_embedding.weight"].shape[0]),
        # OpenCLIP ViT-H (SD 2) uses exact GELU; OpenAI CLIP ViT-L (SD 1) its sigmoid approximation.
        "hidden_act": "gelu" if open_clip else "quick_gelu",
        "layer_norm_eps": 1e-5,
    }


# --- loading


def load_single_file(
    path: str | Path, dtype: Any = jnp.float32, prediction_type: str | None = None
) -> tuple[dict[str, Any], dict[str, weights.Params], dict[str, Any]]:
    """Loads a single-file SD 1.x / 2.x ``.safetensors`` checkpoint into flax modules, without PyTorch.

    Args:
      path: the ``.safetensors`` file (``.ckpt`` pickles are not read).
      dtype: compute dtype of the modules and dtype of the returned params.
      prediction_type: "epsilon" (default; SD 1.x, SD 2.x 512-base) or "v_prediction" (SD 2.x 768-v).
    Returns:
      (modules, params, scheduler_config): {"unet", "vae", "text_encoder"} -> flax module and -> param tree
      (arrays of ``dtype``), and a diffusers scheduler config dict. A single file holds no tokenizer.
    Raises:
      WeightsError: missing / unreadable file, not an SD 1.x/2.x checkpoint (e.g. SDXL), a network missing, or
        weights that do not fit the inferred config (every missing / unexpected / mismatched key listed).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"single-file checkpoint {path} does not exist")
    if path.suffix != ".safetensors":
        raise WeightsError(f"{path} is not a .safetensors file; PyTorch pickles (.ckpt, .pt) are not read")
    parts = _split_components(weights.read_safetensors([path]))
    if "vae" not in parts or not {"clip", "open_clip"} & set(parts):
        raise WeightsError(
            f"{path} lacks the VAE (first_stage_model.*) or the text encoder (cond_stage_model.*): found only "
            f"{', '.join(PREFIXES[n] + '*' for n in parts)}; load_single_file needs all three networks"
        )
    components = _convert(parts)
    configs = _infer_configs(components, "open_clip" in parts, prediction_type)
    modules, params = {}, {}
    for name, config in configs.items():
        if name == "scheduler":
            continue
        class_name = config.get("_class_name") or config["architectures"][0]
        cls, _ = weights.component_class(class_name)
        module = cls(config=cls.config_class.from_dict(config), dtype=dtype)
        tree = weights.torch_to_flax(
            components[name],
            weights.param_shapes(module),
            renames=module.torch_key_renames,
            ignored=module.torch_ignored_keys,
            component=f"{class_name} ({path.name})",
        )
        weights.check_finite(tree, f"{class_name} ({path.name})")
        modules[name], params[name] = module, weights.to_device(tree, dtype)
    return modules, params, configs["scheduler"]
