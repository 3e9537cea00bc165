"""The names of Stability AI's single-file SDXL checkpoints (generative-models code), and their diffusers equivalents.

``sd_xl_base_1.0.safetensors`` holds four networks, ``sd_xl_refiner_1.0.safetensors`` three:

  ``model.diffusion_model.*``                  UNet: SD's LDM names plus ``label_emb.0.{0,2}`` (``add_embedding``)
  ``first_stage_model.*``                      VAE, as SD's
  ``conditioner.embedders.0.transformer.*``    base: CLIP ViT-L (transformers names) -> ``text_encoder``
  ``conditioner.embedders.1.model.*``          base: OpenCLIP ViT-bigG -> ``text_encoder_2``
  ``conditioner.embedders.0.model.*``          refiner: OpenCLIP ViT-bigG, its only text encoder -> ``text_encoder_2``

The OpenCLIP encoder is SD 2's layout (``transformer.resblocks.N`` with fused qkv, ``ln_final``,
``positional_embedding``) with every layer kept (SDXL reads the penultimate hidden state and pools the last) and
``text_projection`` stored as an (in, out) matrix: diffusers' ``text_projection.weight`` transposed. The UNet's
block layout, the VAE and the renaming engine are :mod:`sdjax.loading.ldm_names`'; this is the mapping of
diffusers' ``convert_ldm_unet_checkpoint`` (``addition_embed_type="text_time"``) and ``convert_open_clip_checkpoint``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from sdjax import weights
from sdjax.loading import ldm_names
from sdjax.loading.ldm_names import Pairs, State
from sdjax.weights import WeightsError

FAMILY = "SDXL"
EMBEDDERS = "conditioner.embedders."
# Network (diffusers component name) -> key prefix, per variant.
PREFIXES = {
    "base": {
        "unet": "model.diffusion_model.",
        "vae": "first_stage_model.",
        "text_encoder": "conditioner.embedders.0.transformer.",
        "text_encoder_2": "conditioner.embedders.1.model.",
    },
    "refiner": {
        "unet": "model.diffusion_model.",
        "vae": "first_stage_model.",
        "text_encoder_2": "conditioner.embedders.0.model.",
    },
}
# Not parameters of the inference networks: the VAE's training loss, OpenCLIP's contrastive temperature.
IGNORED = {"vae": ("loss.",), "text_encoder_2": ("logit_scale",)}
_ADD_EMBEDDING = [("label_emb.0.0.", "add_embedding.linear_1."), ("label_emb.0.2.", "add_embedding.linear_2.")]


def is_sdxl(keys: Iterable[str]) -> bool:
    """Whether a single file's keys are SDXL's (its text encoders sit under ``conditioner.embedders.``)."""
    return any(k.startswith(EMBEDDERS) for k in keys)


def variant_of(keys: Iterable[str]) -> str:
    """ "base" (CLIP ViT-L + OpenCLIP bigG) or "refiner" (OpenCLIP bigG only) from an SDXL file's keys."""
    keys = list(keys)
    for variant in ("base", "refiner"):
        if any(k.startswith(PREFIXES[variant]["text_encoder_2"]) for k in keys):
            if variant == "refiner" or any(k.startswith(PREFIXES["base"]["text_encoder"]) for k in keys):
                return variant
    found = sorted({".".join(k.split(".")[:4]) for k in keys if k.startswith(EMBEDDERS)})
    raise WeightsError(
        f"SDXL text encoders not recognised (found {weights._short_list(found)}); expected the base's "
        "conditioner.embedders.0.transformer.* + conditioner.embedders.1.model.* or the refiner's "
        "conditioner.embedders.0.model.*"
    )


# --- renaming tables


def _unet_pairs(layout: ldm_names._UNetLayout) -> Pairs:
    return ldm_names._unet_pairs(layout) + _ADD_EMBEDDING


def _open_clip_pairs(layers: int) -> Pairs:
    return ldm_names._open_clip_pairs(layers) + [("text_projection", "text_projection.weight")]


def _open_clip_layers(state: Mapping[str, np.ndarray], pattern: str) -> int:
    return len(ldm_names.indices(state, pattern))


# --- whole files


def split_components(state: Mapping[str, np.ndarray]) -> dict[str, State]:
    """{"unet" | "vae" | "text_encoder" | "text_encoder_2": LDM state without its prefix} of an SDXL file; keys of
    other networks (``model_ema.*``, schedule buffers) are left out."""
    prefixes = PREFIXES[variant_of(state)]
    parts = {name: {k[len(p) :]: v for k, v in state.items() if k.startswith(p)} for name, p in prefixes.items()}
    parts = {name: ldm_names._strip(part, IGNORED.get(name, ())) for name, part in parts.items() if part}
    if "unet" not in parts or "label_emb.0.0.weight" not in parts["unet"]:
        raise WeightsError(
            "not an SDXL checkpoint: no model.diffusion_model.* UNet with label_emb.0.* (SDXL's add_embedding); "
            "SDXL single files hold the UNet, the VAE (first_stage_model.*) and conditioner.embedders.*"
        )
    return parts


def convert(parts: Mapping[str, State]) -> dict[str, State]:
    """:func:`split_components`' parts -> diffusers / transformers state dicts (same names)."""
    unet = parts["unet"]
    layout = ldm_names.unet_layout_from_ldm(unet)
    out = {"unet": ldm_names._rename(unet, _unet_pairs(layout), "model.diffusion_model", FAMILY)}
    if "vae" in parts:
        out["vae"] = ldm_names.vae_to_diffusers(parts["vae"])
    if "text_encoder" in parts:
        out["text_encoder"] = ldm_names._rename(
            parts["text_encoder"], ldm_names._clip_pairs(), "conditioner.embedders.0.transformer", FAMILY
        )
    if "text_encoder_2" in parts:
        state = parts["text_encoder_2"]
        layers = _open_clip_layers(state, r"transformer\.resblocks\.(\d+)\.")
        state = ldm_names._rename(state, _open_clip_pairs(layers), "conditioner.embedders (OpenCLIP)", FAMILY)
        if "text_projection.weight" in state:
            state["text_projection.weight"] = state["text_projection.weight"].T  # (in, out) -> torch (out, in)
        out["text_encoder_2"] = ldm_names._split_qkv(state)
    return out


def ldm_to_diffusers(state: Mapping[str, np.ndarray]) -> dict[str, State]:
    """Splits a single-file SDXL (base or refiner) state dict into diffusers / transformers state dicts.

    Args:
      state: LDM key -> array (PyTorch layouts, any dtype), e.g. from :func:`sdjax.weights.read_safetensors`.
    Returns:
      {"unet": UNet2DConditionModel keys, "vae": AutoencoderKL keys, "text_encoder": CLIPTextModel keys (base
      only), "text_encoder_2": CLIPTextModelWithProjection keys} (``text_model.`` prefixed text keys).
    Raises:
      WeightsError: not SDXL, unknown text encoders, or keys that do not fit the layout (all listed).
    """
    return convert(split_components(state))


def diffusers_to_ldm(components: Mapping[str, Mapping[str, np.ndarray]]) -> State:
    """Joins diffusers / transformers SDXL state dicts into one single file in the layout of
    ``sd_xl_base_1.0`` (with ``text_encoder``) or ``sd_xl_refiner_1.0`` (without), as ComfyUI / A1111 read.

    Args:
      components: {"unet", "vae", "text_encoder_2"} and, for the base, "text_encoder" -> PyTorch state dict
        (numpy, PyTorch layouts; text keys with or without ``text_model.``).
    Returns:
      LDM key -> array.
    """
    unknown = sorted(set(components) - {"unet", "vae", "text_encoder", "text_encoder_2"})
    missing = sorted({"unet", "vae", "text_encoder_2"} - set(components))
    if unknown or missing:
        raise WeightsError(
            f"diffusers_to_ldm (SDXL): unknown components {unknown}, missing {missing}; accepted: unet, vae, "
            "text_encoder_2 and (base) text_encoder"
        )
    prefixes = PREFIXES["base" if "text_encoder" in components else "refiner"]
    out = {
        "unet": unet_to_ldm(components["unet"]),
        "vae": ldm_names.vae_to_ldm(components["vae"]),
    }
    if "text_encoder" in components:
        text = _with_text_model(components["text_encoder"])
        out["text_encoder"] = ldm_names._rename(text, ldm_names._clip_pairs(), "transformers CLIPTextModel", FAMILY)
    out["text_encoder_2"] = _open_clip_to_ldm(_with_text_model(components["text_encoder_2"]))
    return {prefixes[name] + k: v for name, state in out.items() for k, v in state.items()}


def unet_to_ldm(unet: Mapping[str, Any]) -> State:
    """A diffusers UNet state dict (SDXL's, or SD 1.x / 2.x's: the added-embedding names are simply unused) under
    LDM names without prefix (``input_blocks.4.1.proj_in.weight``, ``label_emb.0.0.weight``). Only the names
    matter: values are carried through as they are."""
    unet = dict(unet)
    pairs = ldm_names._inverse(_unet_pairs(ldm_names.unet_layout_from_diffusers(unet)))
    return ldm_names._rename(unet, pairs, "diffusers UNet", FAMILY)


def _with_text_model(state: Mapping[str, np.ndarray]) -> State:
    keep = lambda k: k.startswith(("text_model.", "text_projection."))
    return {k if keep(k) else f"text_model.{k}": v for k, v in state.items()}


def _open_clip_to_ldm(state: State) -> State:
    layers = _open_clip_layers(state, r"text_model\.encoder\.layers\.(\d+)\.")
    state = {k: v for k, v in ldm_names._fuse_qkv(state).items() if not k.endswith("position_ids")}
    ldm = ldm_names._rename(state, ldm_names._inverse(_open_clip_pairs(layers)), "CLIPTextModelWithProjection", FAMILY)
    ldm["text_projection"] = np.ascontiguousarray(ldm["text_projection"].T)
    return ldm
