"""Original (CompVis / LDM) single-file Stable Diffusion 1.x / 2.x checkpoints, torch-free.

A single file (``v1-5-pruned-emaonly.safetensors``, ``v2-1_768-ema-pruned.safetensors``) holds the three networks
under the names of the original latent-diffusion code:

  ``model.diffusion_model.*``         UNet: input_blocks / middle_block / output_blocks, time_embed, out
  ``first_stage_model.*``             VAE: encoder / decoder with down / up / mid blocks, 1x1-conv attention
  ``cond_stage_model.transformer.*``  SD 1.x text encoder (Hugging Face CLIP names under ``text_model.``)
  ``cond_stage_model.model.*``        SD 2.x text encoder (OpenCLIP: fused qkv, ``transformer.resblocks.N``)

:mod:`sdjax.loading.ldm_names` converts the names to diffusers'. Configs are read from the tensor shapes; what
shapes cannot tell (head counts, norm groups, v-prediction) follows the published SD 1.x / 2.x configs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from sdjax import weights
from sdjax.loading import ldm_names
from sdjax.loading.ldm_names import State
from sdjax.predictions import PREDICTION_TYPES
from sdjax.weights import WeightsError

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
    parts = ldm_names.split_components(state)
    return _infer_configs(ldm_names.convert(parts), "open_clip" in parts, prediction_type)


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
    layout = ldm_names.unet_layout_from_diffusers(state)
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
        "transformer_layers_per_block": len(ldm_names.indices(state, rf"{re.escape(mid)}transformer_blocks\.(\d+)\.")),
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
    blocks, layers = ldm_names.vae_layout(state, "down_blocks", "resnets")
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
        "num_hidden_layers": len(ldm_names.indices(state, r"text_model\.encoder\.layers\.(\d+)\.")),
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
    parts = ldm_names.split_components(weights.read_safetensors([path]))
    if "vae" not in parts or not {"clip", "open_clip"} & set(parts):
        raise WeightsError(
            f"{path} lacks the VAE (first_stage_model.*) or the text encoder (cond_stage_model.*): found only "
            f"{', '.join(ldm_names.PREFIXES[n] + '*' for n in parts)}; load_single_file needs all three networks"
        )
    components = ldm_names.convert(parts)
    configs = _infer_configs(components, "open_clip" in parts, prediction_type)
    networks = {name: config for name, config in configs.items() if name != "scheduler"}
    modules, params = build_networks(networks, components, dtype, path.name)
    return modules, params, configs["scheduler"]


def build_networks(
    configs: Mapping[str, dict[str, Any]],
    components: Mapping[str, State],
    dtype: Any,
    where: str,
    dtypes: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, weights.Params]]:
    """(modules, params) per network: the flax module built from its diffusers / transformers config dict and
    the state dict ``components[name]`` converted into it, in ``dtype`` (or ``dtypes[name]``). WeightsError
    lists every key that does not fit; non-finite weights are refused. ``where`` names the file in errors."""
    modules, params = {}, {}
    for name, config in configs.items():
        dtype_of = (dtypes or {}).get(name, dtype)
        class_name = config.get("_class_name") or config["architectures"][0]
        cls, _ = weights.component_class(class_name)
        try:
            module = cls(config=cls.config_class.from_dict(config), dtype=dtype_of)
        except (TypeError, ValueError) as e:  # a field of the wrong type or value: say which network, keep the class
            raise type(e)(f"{name} config for {where}: {e}") from e
        tree = weights.torch_to_flax(
            components[name],
            weights.param_shapes(module),
            renames=module.torch_key_renames,
            ignored=module.torch_ignored_keys,
            component=f"{class_name} ({where})",
        )
        modules[name], params[name] = module, weights.to_device(tree, dtype_of, component=f"{class_name} ({where})")
    return modules, params
