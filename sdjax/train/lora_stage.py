"""LoRA fine-tuning (Hu et al. 2021) of a pretrained Stable Diffusion: low-rank factors on the UNet's attention,
feed-forward and projection layers (and, optionally, the text encoder's), the base model frozen.

The trained params are the factors only, in the layout of LoRA files (PyTorch: ``down`` (r, in[, kh, kw]), ``up``
(out, r)), under the flax path of the layer they adapt::

    {"lora": {"unet": {"down_blocks_0": {... {"to_q": {"down": (r, in), "up": (out, r)}}}}, "text_encoder": ...}}

so the optimizer state, the EMA and the checkpoints hold nothing else. The loss is the diffusion stage's, on the
params merged on the fly, ``W + alpha / r * up @ down`` per adapted kernel (:func:`sdjax.loading.lora.merged_kernel`,
the code that merges loaded LoRA files), computed from the frozen base (float32 or bfloat16) and the factors:
gradients reach only the factors, and no LoRA-aware network is needed. ``up`` starts at zero (the run starts at the
base model) and ``down`` as PEFT's default, uniform in +-1/sqrt(fan_in).

The workdir's ``model/`` folder is the whole base model (frozen weights) plus ``lora_config.json``: per adapted
component, the PEFT ``LoraConfig`` fields (``r``, ``lora_alpha``, ``target_modules``)
that ``python -m sdjax.export WORKDIR OUT --lora`` writes into the diffusers file's metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from sdjax.loading import lora
from sdjax.train.checks import TrainConfigError
from sdjax.train.diffusion_stage import DiffusionStage
from sdjax.train.stage import Preview
from sdjax.train.steps import LossFn

Params = dict[str, Any]
CONFIG_FILE = "lora_config.json"
ROLES = ("down", "up")


class LoraStage:
    name = "lora"
    reads_captions = True

    def trained(self, config: ml_collections.ConfigDict) -> tuple[str, ...]:
        return ("lora",)  # not a network: every network of model/ is frozen (Model.frozen)

    def write_model_folder(self, config: ml_collections.ConfigDict, folder: Path, batches_fn: Any) -> None:
        """The base model (config.pretrained_path: a diffusers folder, an sdjax workdir or a single file) with all
        its weights, and lora_config.json naming the adapted layers."""
        from sdjax.pipeline import StableDiffusion

        if not config.get("pretrained_path"):
            raise TrainConfigError(
                "the lora stage adapts a pretrained model: set --config.pretrained_path (a diffusers Stable "
                "Diffusion folder, an sdjax workdir or a .safetensors file)"
            )
        pipe = StableDiffusion.from_pretrained(config.pretrained_path)
        targets = target_layers(config, pipe.modules, pipe.params)
        pipe.save_pretrained(folder)
        peft = {c: peft_config(config, c) for c in targets}
        (folder / CONFIG_FILE).write_text(json.dumps(peft, indent=2) + "\n")

    def initial_params(self, config: ml_collections.ConfigDict, model: Any, rng: jax.Array) -> Params:
        """Step-0 float32 factors: ``down`` uniform in +-1/sqrt(fan_in) (PEFT's kaiming-uniform default), ``up``
        zero, so the run starts exactly at the base model."""
        targets = target_layers(config, model.modules, model.frozen)
        factors = {}
        for c, (component, paths) in enumerate(sorted(targets.items())):
            flat = {}
            for i, path in enumerate(paths):
                kernel = model.frozen[component]
                for part in path:
                    kernel = kernel[part]
                fan_out, fan_in, *window = kernel.shape  # (out, in) or (out, in, kh, kw)
                key = jax.random.fold_in(jax.random.fold_in(rng, c), i)
                bound = 1.0 / np.sqrt(fan_in * int(np.prod(window, dtype=int)))
                down_shape = (config.lora.rank, fan_in, *window)
                flat[(*path[:-1], "down")] = jax.random.uniform(key, down_shape, jnp.float32, -bound, bound)
                flat[(*path[:-1], "up")] = jnp.zeros((fan_out, config.lora.rank), jnp.float32)
            factors[component] = traverse_util.unflatten_dict(flat)
        return {"lora": factors}

    def loss_fn(self, config: ml_collections.ConfigDict, model: Any) -> LossFn:
        """The diffusion stage's loss (and metrics) of the base params with the factors merged in."""
        diffusion_loss, scale = DiffusionStage().loss_fn(config, model), lora_scale(config)

        def loss_fn(params, frozen, batch, rng, step):
            return diffusion_loss(merge(frozen, params["lora"], scale), frozen, batch, rng, step)

        return loss_fn

    def preview(self, config: ml_collections.ConfigDict, model: Any, images: np.ndarray) -> Preview:
        """The diffusion stage's samples, of the base params with the factors merged in."""
        draw_merged, scale = DiffusionStage().preview(config, model, images), lora_scale(config)
        merge_ = jax.jit(merge, static_argnums=2)
        return lambda params: draw_merged(merge_(model.frozen, params["lora"], scale))


def lora_scale(config: ml_collections.ConfigDict) -> float:
    """alpha / r, the factor of ``up @ down`` (config.lora.alpha, config.lora.rank)."""
    rank, alpha = config.lora.rank, config.lora.alpha
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise TrainConfigError(f"lora.rank must be an int >= 1, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not np.isfinite(alpha) or alpha <= 0:
        raise TrainConfigError(f"lora.alpha must be a finite number > 0, got {alpha!r}")
    return float(alpha) / rank


def merge(base: Params, factors: Params, scale: float) -> Params:
    """{component: ``base[component]`` with each adapted kernel W replaced by W + scale * up @ down} for the
    components in ``factors`` (a ``{"lora": ...}`` subtree). Traceable; other kernels are the base arrays."""
    merged = {}
    for component, tree in factors.items():
        flat = traverse_util.flatten_dict(base[component])
        for path, pair in layers(tree).items():
            flat[path] = lora.merged_kernel(flat[path], [(pair["down"], pair["up"], scale)])
        merged[component] = traverse_util.unflatten_dict(flat)
    return merged


def layers(tree: Params) -> dict[tuple[str, ...], dict[str, Any]]:
    """{flax kernel path: {"down": ..., "up": ...}} of one component's factor tree."""
    out: dict[tuple[str, ...], dict[str, Any]] = {}
    for path, value in traverse_util.flatten_dict(tree).items():
        out.setdefault((*path[:-1], "kernel"), {})[path[-1]] = value
    return out


def target_layers(config: ml_collections.ConfigDict, modules: Params, params: Params) -> dict[str, list[tuple]]:
    """{component: flax kernel paths of the adapted layers}: the layers whose PyTorch module name is one of
    config.lora.unet_targets (text_encoder_targets when config.lora.text_encoder) or ends with "." + one of them,
    as PEFT's ``target_modules`` match."""
    wanted = {"unet": tuple(config.lora.unet_targets)}
    if config.lora.text_encoder:
        wanted["text_encoder"] = tuple(config.lora.text_encoder_targets)
    targets = {}
    for component, names in wanted.items():
        kernels = [p for p in traverse_util.flatten_dict(params[component]) if p[-1] == "kernel"]
        named = {p: lora.module_name(modules[component], p) for p in kernels}
        targets[component] = sorted(p for p, n in named.items() if any(n == t or n.endswith("." + t) for t in names))
        if not targets[component]:
            some = sorted({n.rsplit(".", 1)[-1] for n in named.values()})
            raise TrainConfigError(
                f"lora targets {list(names)} match no layer of the {component}; its layer names end with: "
                f"{', '.join(some[:12])}"
            )
    return targets


def peft_config(config: ml_collections.ConfigDict, component: str) -> dict[str, Any]:
    """The PEFT ``LoraConfig`` fields of one component's adapter (diffusers stores them in LoRA files). The targets
    are the configured names: PEFT matches them as :func:`target_layers` does (equal, or a "."-bounded suffix),
    whatever prefix the PyTorch model gives its modules."""
    targets = config.lora.unet_targets if component == "unet" else config.lora.text_encoder_targets
    return {
        "r": config.lora.rank,
        "lora_alpha": float(config.lora.alpha),
        "target_modules": sorted(targets),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
    }
