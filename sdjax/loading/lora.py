"""LoRA adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): read kohya / A1111 and
diffusers / PEFT ``.safetensors`` files and merge them into a pipeline's params.

A LoRA adds to a layer's weight W (PyTorch layout, out x in) the low-rank update ``weight * alpha / r * up @ down``,
``down`` (r, in[, kh, kw]) and ``up`` (out, r[, 1, 1]); ``weight`` is the adapter's scale chosen at run time
(``set_adapters``), ``alpha / r`` the scale it was trained with.

Formats, told apart by the keys:

- kohya / A1111: ``lora_unet_<module>`` / ``lora_te_<module>`` (SDXL: ``lora_te1_`` / ``lora_te2_``), the module
  path with "." flattened to "_" (diffusers names, or LDM names ``input_blocks_1_1_...`` for the UNet), then
  ``.lora_down.weight``, ``.lora_up.weight`` and ``.alpha`` (absent: alpha = r). Linear, 1x1-conv and LoCon
  3x3-conv targets (down (r, in, 3, 3), up (out, r, 1, 1)).
- diffusers / PEFT: ``<component>.<module>.lora_A.weight`` / ``.lora_B.weight`` (older files: ``.lora.down`` /
  ``.lora.up``, ``.lora_linear_layer.down`` / ``.up``, ``attn1.processor.to_q_lora.down``), ``<component>`` one of
  ``unet``, ``text_encoder``, ``text_encoder_2``. alpha comes from ``<module>.alpha`` keys, else from the PEFT
  configs diffusers stores in the file's ``lora_adapter_metadata`` (``unet.lora_alpha``, ``unet.alpha_pattern``,
  ``unet.use_rslora`` ...), else alpha = r.

kohya names flatten "." to "_", which is ambiguous (``to_out_0``, ``time_emb_proj``); they are resolved against the
names of the layers of the loaded params, never by string surgery.

**Fused, not applied on the fly.** :func:`merged_params` adds the updates of the active adapters to float32 copies of
the targeted kernels (one compiled merge, scales traced) and casts them back to the params' dtype; the pipeline
keeps the params as loaded and re-merges from them when the scales change, and ``unload`` gives those params back
(bit-exact, nothing subtracted). The shapes never change, so the compiled sampler is reused. Measured with
``python -m benchmarks.bench_lora`` (SD 1.5 UNet widths, rank 16 on all 236 attention, feed-forward, proj_in/out
and ResNet conv1/conv2 layers, batch 2 = one guided step at 32x32 latents, float32, a 2-core CPU shared with other
jobs, so +-30%):

=========================================  ===========================================
fused: first merge (compile included)      13.2 s
fused: merge per ``set_adapters``          3.4 s, once per change of adapters / weights
fused: UNet step                           5.58 s (the base model's step: no per-step cost)
unfused (traced scales): UNet step         6.27 s (+0.69 s, +12%, on every step)
unfused overhead per 50-step image         34 s
=========================================  ===========================================

Neither recompiles when a scale changes (the merge's weights are traced too). Fused costs about five unfused
steps' overhead per change of weights, then nothing: it wins from the first image, and by far when many images are
made per setting. Its price is memory: the merged kernels are new arrays next to the kept originals.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import SafetensorError, safe_open

from sdjax import weights
from sdjax.errors import PipelineError

# Never unpickled: loading a pickle runs code from the file.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
# File names diffusers' save_lora_weights writes, looked for when a folder is given.
LORA_FILE_NAMES = ("pytorch_lora_weights.safetensors",)
KOHYA_PREFIXES = {
    "lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2"
}  # fmt: skip
DIFFUSERS_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
# The model family a LoRA was trained for, from the width of the UNet's cross-attention context.
FAMILIES_BY_CONTEXT_WIDTH = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}
# Keys only SDXL models have: its second text encoder, its added (pooled text + size) conditioning.
_SDXL_MARKERS = ("lora_te2_", "text_encoder_2.", "add_embedding", "label_emb", "add_time_proj")

_KOHYA_KEY = re.compile(r"^(lora_unet|lora_te1|lora_te2|lora_te)_(.+?)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_DIFFUSERS_KEY = re.compile(
    r"^(unet|text_encoder_2|text_encoder)\.(.+?)\."
    r"(lora_A\.weight|lora_B\.weight|lora\.down\.weight|lora\.up\.weight|lora_linear_layer\.down\.weight"
    r"|lora_linear_layer\.up\.weight|alpha)$"
)
# diffusers < 0.21 attention-processor names: attn1.processor.to_q_lora.down.weight -> attn1.to_q
_PROCESSOR_KEY = re.compile(r"^(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_ROLES = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_A.weight": "down", "lora_B.weight": "up",
          "lora.down.weight": "down", "lora.up.weight": "up", "lora_linear_layer.down.weight": "down",
          "lora_linear_layer.up.weight": "up", "alpha": "alpha"}  # fmt: skip
# Keys of LoRA variants that are not a plain low-rank update (DoRA, LoHa, LoKr, biased lora_B).
_VARIANT_MARKERS = ("dora_scale", "lora_magnitude_vector", "hada_", "lokr_", "lora_B.bias", ".diff", "oft_")

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class LoraLayer:
    """The update of one kernel: ``delta W = scale * up @ down`` in PyTorch layout.

    Attributes:
      component: "unet", "text_encoder", ... (a key of the pipeline's params).
      path: flax path of the kernel in ``params[component]`` (ends with "kernel").
      down: float32 (r, in) for a linear kernel, (r, in, kh, kw) for a conv kernel.
      up: float32 (out, r).
      scale: alpha / r (alpha / sqrt(r) for rsLoRA).
    """

    component: str
    path: tuple[str, ...]
    down: Any
    up: Any
    scale: float


@dataclasses.dataclass(frozen=True)
class LoraAdapter:
    """One LoRA file, resolved against a pipeline's params: its name, file, format ("kohya" or "diffusers") and
    layers."""

    name: str
    file: str
    format: str
    layers: tuple[LoraLayer, ...]


@dataclasses.dataclass(frozen=True)
class LoraState:
    """The LoRAs of a pipeline: its params before any of them (kept by reference: unloading gives them back
    bit-exact), the loaded adapters, and the active ones with their weights (as diffusers' ``set_adapters``)."""

    base: Mapping[str, Any]
    adapters: Mapping[str, LoraAdapter] = dataclasses.field(default_factory=dict)
    active: Mapping[str, float] = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- pipeline state


def add_adapter(state: LoraState, adapter: LoraAdapter, weight: float = 1.0) -> LoraState:
    """``state`` with ``adapter`` loaded and, as diffusers' ``load_lora_weights``, the only active one."""
    if not isinstance(adapter.name, str) or not adapter.name:
        raise PipelineError(f"adapter_name must be a non-empty string, got {adapter.name!r}")
    check_weight(weight, adapter.name)
    if adapter.name in state.adapters:
        raise PipelineError(
            f"a LoRA named {adapter.name!r} is already loaded; pass another adapter_name, or unload_lora_weights()"
        )
    return dataclasses.replace(state, adapters={**state.adapters, adapter.name: adapter}, active={adapter.name: weight})


def set_adapters(state: LoraState | None, names: str | Sequence[str], weights: Any = None) -> LoraState:
    """``state`` with exactly ``names`` active, each with its weight (a number for all, a list of one per name,
    or None: 1.0), as diffusers' ``set_adapters``. An empty list turns every LoRA off."""
    if state is None:
        raise PipelineError("set_adapters: no LoRA is loaded; load_lora_weights first")
    names = [names] if isinstance(names, str) else list(names)
    loaded = list(state.adapters)
    unknown = [n for n in names if n not in loaded]
    if unknown or len(set(names)) != len(names):
        what = f"unknown adapter(s) {unknown}" if unknown else f"repeated adapter names {names}"
        raise PipelineError(f"set_adapters: {what}; loaded: {', '.join(loaded)}")
    if weights is None or isinstance(weights, (int, float, np.number)):
        weights = [1.0 if weights is None else weights] * len(names)
    if not isinstance(weights, (list, tuple)) or len(weights) != len(names):
        raise PipelineError(f"set_adapters: pass one weight per adapter ({len(names)}), got {weights!r:.80}")
    for name, weight in zip(names, weights, strict=True):
        check_weight(weight, name)
    return dataclasses.replace(state, active={n: float(w) for n, w in zip(names, weights, strict=True)})


def with_base(state: LoraState, component: str, params: Any) -> LoraState:
    """``state`` whose base params of ``component`` are ``params`` (e.g. grown by textual inversion)."""
    return dataclasses.replace(state, base={**state.base, component: params})


def check_weight(weight: Any, name: str) -> None:
    if isinstance(weight, bool) or not isinstance(weight, (int, float, np.number)) or not math.isfinite(weight):
        raise PipelineError(f"the weight (scale) of LoRA {name!r} must be a finite number, got {weight!r}")


def default_adapter_name(state: LoraState | None) -> str:
    """diffusers' default names: default_0, default_1, ..."""
    return f"default_{len(state.adapters) if state else 0}"


def merged_params(state: LoraState) -> Params:
    """``state.base`` with the active adapters merged: ``W + sum_a weight_a * scale * up @ down`` per targeted
    kernel, computed in float32 and cast to the kernel's dtype. Components and kernels no active adapter targets
    are the base objects themselves. One compiled merge per set of targets; the weights are traced."""
    updates: dict[tuple[str, tuple[str, ...]], list[tuple[Any, Any, float]]] = collections.defaultdict(list)
    for name, weight in state.active.items():
        for layer in state.adapters[name].layers:
            updates[(layer.component, layer.path)].append((layer.down, layer.up, weight * layer.scale))
    if not updates:
        return dict(state.base)
    keys = sorted(updates)
    kernels = [_get(state.base[c], p) for c, p in keys]
    factors = [[(down, up) for down, up, _ in updates[k]] for k in keys]
    coefficients = [jnp.asarray([c for _, _, c in updates[k]], jnp.float32) for k in keys]
    merged = _merge(kernels, factors, coefficients)
    out = dict(state.base)
    for component in {c for c, _ in keys}:
        flat = traverse_util.flatten_dict(state.base[component])
        flat.update({p: m for (c, p), m in zip(keys, merged, strict=True) if c == component})
        out[component] = traverse_util.unflatten_dict(flat)
    return out


@jax.jit
def _merge(kernels: list, factors: list, coefficients: list) -> list:
    merged = []
    for kernel, pairs, coefficient in zip(kernels, factors, coefficients, strict=True):
        merged.append(merged_kernel(kernel, [(down, up, coefficient[i]) for i, (down, up) in enumerate(pairs)]))
    return merged


def merged_kernel(kernel: jax.Array, updates: Sequence[tuple[Any, Any, Any]]) -> jax.Array:
    """``kernel + sum(coefficient * up @ down)`` over ``updates`` of (down, up, coefficient), in float32, cast back
    to the kernel's dtype. kernel: (out, in) or (out, in, kh, kw) (PyTorch's layout, kept by sdjax's layers); down
    (r, in[, kh, kw]), up (out, r). Traceable:
    training differentiates it with respect to the factors (:mod:`sdjax.train.lora_stage`)."""
    delta = sum(coefficient * _delta(down, up, kernel.ndim) for down, up, coefficient in updates)
    return (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)


def _delta(down: jax.Array, up: jax.Array, ndim: int) -> jax.Array:
    """up @ down in the kernel layout: (out, in) for a linear kernel, (out, in, kh, kw) for a conv kernel."""
    spec = "ri,or->oi" if ndim == 2 else "rihw,or->oihw"
    return jnp.einsum(spec, down, up, precision=jax.lax.Precision.HIGHEST)


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        tree = tree[part]
    return tree


# ----------------------------------------------------------------------------------------------- files


def read_adapter(path: Any, name: str, modules: Mapping[str, Any], params: Mapping[str, Any]) -> LoraAdapter:
    """Reads a LoRA ``.safetensors`` file (or a folder holding ``pytorch_lora_weights.safetensors``) and resolves
    it against a pipeline's modules and params (e.g. {"unet", "text_encoder"}; SDXL adds "text_encoder_2").

    Raises:
      PipelineError (one line): missing file, pickle, unreadable file, keys that match no layer, a LoRA of another
      model family, rank / shape mismatches, NaN/inf values, unsupported LoRA variants (DoRA, LoHa, LoKr).
    """
    file = _lora_file(Path(path))
    state, metadata = _read(file)
    fmt, groups, unknown = _group(state)
    where = f"LoRA {file.name}"
    _check_family(where, state, modules, groups)
    if unknown:
        variants = sorted({m for k in unknown for m in _VARIANT_MARKERS if m in k})
        if variants:
            raise PipelineError(f"{where}: LoRA variant keys ({', '.join(variants)}) are not supported, only LoRA")
        raise PipelineError(
            f"{where}: {len(unknown)} keys are not LoRA weights of a known format "
            f"({weights._short_list(sorted(unknown), 3)}); expected kohya lora_unet_*/lora_te_* or diffusers "
            "unet.*/text_encoder.* lora_A/lora_B keys"
        )
    if not groups:
        raise PipelineError(f"{where} holds no LoRA weights")
    configs = _peft_configs(metadata)
    indexes = {c: _layer_index(modules[c], params[c], kohya=fmt == "kohya") for c in {c for c, _ in groups}}
    layers, problems = [], collections.defaultdict(list)
    for (component, module), parts in sorted(groups.items()):
        target = indexes[component].get(module)
        if target is None:
            problems["unmatched"].append(f"{component}:{module}")
            continue
        layer = _layer(component, module, target, parts, _get(params[component], target), configs.get(component))
        if isinstance(layer, str):
            problems[layer.split(":", 1)[0]].append(layer.split(":", 1)[1])
        else:
            layers.append(layer)
    _raise_problems(where, problems, modules)
    return LoraAdapter(name, str(file), fmt, tuple(layers))


def _lora_file(path: Path) -> Path:
    if not path.exists():
        raise PipelineError(f"LoRA file {path} does not exist")
    if path.is_dir():
        found = [path / n for n in LORA_FILE_NAMES if (path / n).is_file()] or sorted(path.glob("*.safetensors"))
        if len(found) != 1:
            raise PipelineError(
                f"{path} is a folder with {len(found)} .safetensors files; pass the LoRA file itself "
                f"(or a folder with {LORA_FILE_NAMES[0]})"
            )
        path = found[0]
    if path.suffix in PICKLE_SUFFIXES:
        raise PipelineError(
            f"{path.name} is a PyTorch pickle ({path.suffix}); sdjax does not unpickle files (it can run code): "
            "convert it to .safetensors"
        )
    if path.suffix != ".safetensors":
        raise PipelineError(f"{path.name}: LoRA files are read as .safetensors only (got {path.suffix!r})")
    return path


def _read(file: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    try:
        with safe_open(str(file), framework="numpy") as f:
            metadata = f.metadata() or {}
        return weights.read_safetensors([file]), metadata
    except (OSError, SafetensorError, weights.WeightsError) as e:
        raise PipelineError(f"cannot read LoRA {file}: {str(e).splitlines()[0]}") from e


def _group(state: Mapping[str, np.ndarray]) -> tuple[str, dict[tuple[str, str], dict[str, Any]], list[str]]:
    """(format, {(component, module name): {"down"|"up"|"alpha": value}}, keys of no known format)."""
    groups: dict[tuple[str, str], dict[str, Any]] = collections.defaultdict(dict)
    unknown, formats = [], set()
    for key, value in state.items():
        if m := _KOHYA_KEY.match(key):
            formats.add("kohya")
            groups[(KOHYA_PREFIXES[m.group(1)], m.group(2))][_ROLES[m.group(3)]] = value
        elif key.split(".", 1)[0] in DIFFUSERS_COMPONENTS and (m := _PROCESSOR_KEY.match(key.split(".", 1)[-1])):
            module = f"{m.group(1)}.{m.group(2)}" + (".0" if m.group(2) == "to_out" else "")
            formats.add("diffusers")
            groups[(key.split(".", 1)[0], module)][m.group(3)] = value
        elif m := _DIFFUSERS_KEY.match(key):
            formats.add("diffusers")
            groups[(m.group(1), m.group(2))][_ROLES[m.group(3)]] = value
        else:
            unknown.append(key)
    if len(formats) > 1:
        raise PipelineError("the LoRA file mixes kohya (lora_unet_*) and diffusers (unet.*) keys; one format per file")
    return (formats.pop() if formats else "kohya"), dict(groups), unknown


def _peft_configs(metadata: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """{component: PEFT LoraConfig dict} from diffusers' ``lora_adapter_metadata`` (keys ``unet.lora_alpha``...)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as e:
        raise PipelineError(f"the LoRA's lora_adapter_metadata is not JSON: {e}") from e
    configs: dict[str, dict[str, Any]] = collections.defaultdict(dict)
    for key, value in flat.items() if isinstance(flat, dict) else ():
        component, _, field = key.partition(".")
        configs[component][field] = value
    return dict(configs)


def _layer_index(module: Any, params: Any, kohya: bool) -> dict[str, tuple[str, ...]]:
    """The names a LoRA file may give each kernel of ``params`` -> its flax path: the PyTorch module path, with
    and without the module's export prefix (CLIP's ``text_model.``); for kohya files with "." flattened to "_",
    plus the UNet's LDM names."""
    index: dict[str, tuple[str, ...]] = {}
    for path in traverse_util.flatten_dict(params):
        if path[-1] != "kernel":
            continue
        index[module_name(module, path)] = path
        index[weights.path_to_torch_key(path).removesuffix(".weight")] = path
    if kohya:
        index = {name.replace(".", "_"): path for name, path in index.items()}
        index.update({k: v for k, v in _ldm_names(params).items() if k not in index})
    return index


def module_name(module: Any, path: tuple[str, ...]) -> str:
    """The PyTorch module name (diffusers / transformers) of the layer whose kernel is at flax ``path`` in the
    params of ``module``: "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "text_model.encoder.layers.0.self_attn.q_proj" (the names of LoRA files, with "." flattened to "_" by kohya)."""
    name = weights.path_to_torch_key(path).removesuffix(".weight")
    for pattern, repl in getattr(module, "torch_export_renames", ()):
        name = re.sub(pattern, repl, name)
    return name


def _ldm_names(params: Any) -> dict[str, tuple[str, ...]]:
    """kohya names of the UNet's kernels under the original LDM names (``input_blocks_1_1_proj_in``; SDXL's too);
    empty when ``params`` are no UNet's."""
    from sdjax.loading import ldm_names_xl

    flat = traverse_util.flatten_dict(params)
    if "conv_in" not in {p[0] for p in flat}:
        return {}
    try:  # the renaming tables carry any value: carry each kernel's flax path through them
        ldm = ldm_names_xl.unet_to_ldm({weights.path_to_torch_key(p): p for p in flat})
    except (weights.WeightsError, KeyError, ValueError):
        return {}
    return {k.removesuffix(".weight").replace(".", "_"): p for k, p in ldm.items() if p[-1] == "kernel"}


def _layer(
    component: str, module: str, target: tuple, parts: dict, kernel: Any, config: dict | None
) -> LoraLayer | str:
    """The LoraLayer of one module, or "problem kind:description"."""
    if "down" not in parts or "up" not in parts:
        return f"incomplete:{component}:{module} (has {', '.join(sorted(parts))})"
    down, up = (np.asarray(parts[r], np.float32) for r in ("down", "up"))
    if not (np.isfinite(down).all() and np.isfinite(up).all() and np.isfinite(parts.get("alpha", 0.0)).all()):
        return f"non-finite:{component}:{module}"
    shape = tuple(kernel.shape)  # (out, in) or (out, in, kh, kw)
    rank = down.shape[0] if down.ndim else 0
    if down.ndim == 4 and len(shape) == 2 and down.shape[2:] == (1, 1):
        down = down[:, :, 0, 0]  # 1x1-conv LoRA stored for a linear layer
    if down.ndim == 2 and len(shape) == 4 and shape[2:] == (1, 1):
        down = down[:, :, None, None]
    if up.ndim == 4 and up.shape[2:] == (1, 1):
        up = up[:, :, 0, 0]
    expected_down = (rank, *shape[1:])
    if up.ndim != 2 or up.shape != (shape[0], rank) or down.shape != expected_down:
        return (
            f"shape:{component}:{module} down {tuple(parts['down'].shape)}, up {tuple(parts['up'].shape)} vs "
            f"layer (out, in{', kh, kw' if len(shape) == 4 else ''}) = {shape}"
        )
    alpha, rank_scale = _alpha(module, rank, parts, config)
    return LoraLayer(component, target, jnp.asarray(down), jnp.asarray(up), alpha / rank_scale)


def _alpha(module: str, rank: int, parts: dict, config: dict | None) -> tuple[float, float]:
    """(alpha, r or sqrt(r) for rsLoRA): a stored ``.alpha``, else the PEFT config's (its alpha_pattern first,
    matched as PEFT matches: the pattern is the module name or a "."-bounded suffix of it), else r."""
    if "alpha" in parts:
        return float(np.asarray(parts["alpha"]).reshape(-1)[0]), rank
    if not config:
        return float(rank), rank
    if config.get("use_dora"):
        raise PipelineError("DoRA LoRAs (use_dora) are not supported; only plain LoRA")
    alpha = config.get("lora_alpha", config.get("r", rank))
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    return float(alpha), (math.sqrt(rank) if config.get("use_rslora") else rank)


def _check_family(where: str, state: Mapping[str, np.ndarray], modules: Mapping[str, Any], groups: dict) -> None:
    """PipelineError when the LoRA is for another model family: components the pipeline lacks (an SDXL LoRA's
    second text encoder), SDXL-only layers, or a cross-attention context of another width."""
    have = ", ".join(modules)
    missing = sorted({c for c, _ in groups} - set(modules))
    sdxl = "text_encoder_2" in modules
    markers = sorted({m.strip("._") for k in state for m in _SDXL_MARKERS if m in k})
    if missing or (markers and not sdxl):
        family = "SDXL " if markers else ""
        raise PipelineError(
            f"{where} is a {family}LoRA for another model family: it has {', '.join(missing or markers)} weights; "
            f"this pipeline has {have}"
        )
    widths = {
        int(np.shape(parts["down"])[1])
        for (component, module), parts in groups.items()
        if component == "unet" and re.search(r"attn2[._]to_[kv]$", module) and np.ndim(parts.get("down")) >= 2
    }
    want = modules["unet"].config.cross_attention_dim if "unet" in modules else None
    if widths and want is not None and widths != {want}:
        got = "/".join(f"{w} ({FAMILIES_BY_CONTEXT_WIDTH.get(w, 'unknown family')})" for w in sorted(widths))
        mine = f"{want} ({FAMILIES_BY_CONTEXT_WIDTH.get(want, 'this model')})"
        raise PipelineError(
            f"{where} is a LoRA for another model family: its cross-attention context is {got} wide, this "
            f"pipeline's UNet takes {mine}"
        )


def _raise_problems(where: str, problems: Mapping[str, list[str]], modules: Mapping[str, Any]) -> None:
    messages = {
        "unmatched": "keys match no layer of this pipeline",
        "incomplete": "layers lack a down or up weight",
        "non-finite": "layers hold NaN or inf values (the file is damaged)",
        "shape": "layers have a rank or shape that does not fit the model",
    }
    for kind, message in messages.items():
        items = problems.get(kind)
        if items:
            raise PipelineError(f"{where}: {len(items)} {message}: {weights._short_list(items, 3)}; nothing applied")
