"""The names of the original (CompVis / LDM) Stable Diffusion checkpoints, and their diffusers equivalents.

A single file holds the three networks under the names of the original latent-diffusion code:

  ``model.diffusion_model.*``         UNet: input_blocks / middle_block / output_blocks, time_embed, out
  ``first_stage_model.*``             VAE: encoder / decoder with down / up / mid blocks, 1x1-conv attention
  ``cond_stage_model.transformer.*``  SD 1.x text encoder (Hugging Face CLIP names under ``text_model.``)
  ``cond_stage_model.model.*``        SD 2.x text encoder (OpenCLIP: fused qkv, ``transformer.resblocks.N``)

Conversion to and from the diffusers / transformers names is a rename through a table of (LDM prefix, diffusers
prefix) pairs generated from the block layout, plus the few structural differences that a rename cannot express
(1x1 convs vs linear layers in the VAE attention, OpenCLIP's fused qkv, SD 2's penultimate text layer). This is
the mapping of diffusers' ``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint`` and
``convert_open_clip_checkpoint``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from sdjax import weights
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


def indices(keys: Any, pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := regex.match(k))})


def unet_layout_from_ldm(state: Mapping[str, Any]) -> _UNetLayout:
    blocks = len(indices(state, r"input_blocks\.(\d+)\.0\.op\.weight$")) + 1
    inputs = indices(state, r"input_blocks\.(\d+)\.")
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


def unet_layout_from_diffusers(state: Mapping[str, Any]) -> _UNetLayout:
    blocks = len(indices(state, r"down_blocks\.(\d+)\."))
    return _UNetLayout(
        blocks,
        len(indices(state, r"down_blocks\.0\.resnets\.(\d+)\.")),
        tuple(f"down_blocks.{b}.attentions.0.proj_in.weight" in state for b in range(blocks)),
        tuple(f"up_blocks.{b}.attentions.0.proj_in.weight" in state for b in range(blocks)),
    )


def vae_layout(state: Mapping[str, Any], down: str, block: str) -> tuple[int, int]:
    """(blocks, ResNets per encoder block) from keys ``encoder.<down>.N.<block>.M.*``."""
    return (
        len(indices(state, rf"encoder\.{down}\.(\d+)\.")),
        len(indices(state, rf"encoder\.{down}\.0\.{block}\.(\d+)\.")),
    )


# --- renaming engine


def _rename(state: Mapping[str, np.ndarray], pairs: Pairs, what: str, family: str = "SD 1.x/2.x") -> State:
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
            f"{what}: {len(unknown)} keys do not fit the {family} layout ({weights._short_list(sorted(unknown))})"
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


def split_components(state: Mapping[str, np.ndarray]) -> dict[str, State]:
    """{"unet" | "vae" | "clip" | "open_clip": state without its prefix} for the networks present."""
    if any(k.startswith("conditioner.embedders.") for k in state):
        raise WeightsError(
            "this is an SDXL checkpoint (conditioner.embedders.* keys); SDXL is not supported by the SD 1.x/2.x "
            "converter: use sdjax.loading.ldm_names_xl.ldm_to_diffusers (or sdjax.StableDiffusionXL.from_pretrained)"
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


def convert(parts: dict[str, State]) -> dict[str, State]:
    unet = parts["unet"]
    out = {"unet": _rename(unet, _unet_pairs(unet_layout_from_ldm(unet)), "model.diffusion_model")}
    if "vae" in parts:
        out["vae"] = vae_to_diffusers(parts["vae"])
    if "clip" in parts:
        # Files saved with transformers < 4.19 lack the text_model. level.
        state = {
            re.sub(r"^(embeddings|encoder|final_layer_norm)\.", r"text_model.\1.", k): v
            for k, v in parts["clip"].items()
        }
        out["text_encoder"] = _rename(state, _clip_pairs(), "cond_stage_model.transformer")
    elif "open_clip" in parts:
        # SD 2 conditions on the penultimate layer's output (then ln_final): the last layer is never run.
        last = len(indices(parts["open_clip"], r"transformer\.resblocks\.(\d+)\.")) - 1
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
    return convert(split_components(state))


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
        pairs = _inverse(_unet_pairs(unet_layout_from_diffusers(unet)))
        out.update(_prefixed("unet", _rename(unet, pairs, "diffusers UNet")))
    if components.get("vae"):
        out.update(_prefixed("vae", vae_to_ldm(components["vae"])))
    text = {
        k if k.startswith("text_model.") else f"text_model.{k}": v
        for k, v in components.get("text_encoder", {}).items()
    }
    if text:
        if open_clip is None:
            open_clip = np.ndim(unet.get("mid_block.attentions.0.proj_in.weight")) == 2
        out.update(_open_clip_to_ldm(text) if open_clip else _clip_to_ldm(text))
    return out


def vae_to_diffusers(state: State) -> State:
    """An LDM VAE state dict (``first_stage_model.`` removed) in diffusers ``AutoencoderKL`` names."""
    pairs = _vae_pairs(*vae_layout(state, "down", "block"))
    return _vae_attention_to_linear(_rename(state, pairs, "first_stage_model"))


def vae_to_ldm(state: Mapping[str, np.ndarray]) -> State:
    """A diffusers ``AutoencoderKL`` state dict (legacy attention names accepted) in LDM names, unprefixed."""
    vae = {_legacy_vae_name(k): v for k, v in state.items()}
    pairs = _inverse(_vae_pairs(*vae_layout(vae, "down_blocks", "resnets")))
    return _rename(_vae_attention_to_conv(vae), pairs, "diffusers AutoencoderKL")


def _clip_to_ldm(state: State) -> State:
    return _prefixed("clip", _rename(state, _clip_pairs(), "transformers CLIPTextModel"))


def _open_clip_to_ldm(state: State) -> State:
    layers = len(indices(state, r"text_model\.encoder\.layers\.(\d+)\."))
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
