"""Stable Diffusion weights without PyTorch: diffusers / transformers safetensors <-> flax parameter trees.

The flax modules name their parameters after the PyTorch attribute paths (list indices joined with "_"), so the
conversion is a renaming (``weight`` -> ``kernel`` / ``scale`` / ``embedding``): kernels keep PyTorch's layouts,
(out, in) and (out, in, kh, kw), so each tensor is copied as it is stored. The target structure comes from
``jax.eval_shape`` of the module's init (no random init, no allocation), and every missing, unexpected or
shape-mismatched key is reported in one :class:`WeightsError`.
"""

from __future__ import annotations

import json
import mmap
import os
import re
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

# PyTorch attributes that are nn.ModuleList / nn.Sequential in diffusers and transformers: their numeric index
# becomes a "_N" suffix in flax and is split off again on export. Other names keep their underscore (linear_1).
TORCH_LIST_ATTRS = frozenset(
    {"down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks", "downsamplers", "upsamplers",
     "to_out", "layers", "net", "blocks", "controlnet_down_blocks"}
)  # fmt: skip

# Where each component class lives, and which library's file conventions it follows.
COMPONENTS: dict[str, tuple[str, str]] = {
    "UNet2DConditionModel": ("sdjax.models.unet", "diffusers"),
    "ControlNetModel": ("sdjax.models.controlnet", "diffusers"),
    "AutoencoderKL": ("sdjax.models.vae", "diffusers"),
    "CLIPTextModel": ("sdjax.models.clip", "transformers"),
    "CLIPTextModelWithProjection": ("sdjax.models.clip", "transformers"),
}
DIFFUSERS_VERSION = "0.42.1"  # written into exported configs: the diffusers release sdjax is tested against
WEIGHTS_NAME = {"diffusers": "diffusion_pytorch_model", "transformers": "model"}

Params = dict[str, Any]


class WeightsError(ValueError):
    """Weight files that are missing, unreadable, or do not fit the model built from config.json."""


def _short_list(items: list[str], limit: int = 5) -> str:
    more = f", ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


# --- files


def read_json(path: str | Path) -> dict[str, Any]:
    """A JSON object from ``path``; WeightsError naming the file when it is unreadable or not a JSON object."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path} is not a readable JSON file: {e}") from e
    if not isinstance(value, dict):
        raise WeightsError(f"{path} holds a JSON {type(value).__name__}, expected an object")
    return value


def find_weight_files(folder: str | Path, library: str = "diffusers", variant: str | None = None) -> list[Path]:
    """The safetensors file(s) of one component folder: ``<name>[.variant].safetensors`` or a sharded
    ``<name>[.variant].safetensors.index.json``. Without a variant, the plain file wins over ``.fp16``."""
    folder = Path(folder)
    stem = WEIGHTS_NAME[library]
    variants = [variant] if variant else [None, "fp16", "bf16"]
    for v in variants:
        name = f"{stem}.{v}.safetensors" if v else f"{stem}.safetensors"
        if (folder / name).is_file():
            return [folder / name]
        index = folder / f"{name}.index.json"
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise WeightsError(f"{index} has no weight_map; expected a safetensors shard index")
            return [folder / f for f in sorted(set(weight_map.values()))]
    found = sorted(p.name for p in folder.glob("*") if p.suffix in {".safetensors", ".bin", ".ckpt", ".pt"})
    hint = " (PyTorch pickles are not read: re-save with safe_serialization=True)" if found else ""
    raise WeightsError(
        f"no {stem}[.fp16|.bf16].safetensors (or sharded .index.json) in {folder}; found: "
        f"{', '.join(found) or 'no weight files'}{hint}"
    )


SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "I64": np.int64,
    "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip


def read_safetensors(files: Iterable[str | Path]) -> dict[str, np.ndarray]:
    """All tensors of the given safetensors files as read-only numpy arrays (bfloat16 via ml_dtypes).

    The arrays are views of the memory-mapped files: nothing is read until a tensor's values are used, and the
    one copy a load makes is :func:`to_device`'s (the files must not change while the views are alive)."""
    state: dict[str, np.ndarray] = {}
    for file in files:
        if not Path(file).is_file():
            raise WeightsError(f"weight file {file} does not exist (listed in the sharded index)")
        try:
            with safe_open(str(file), framework="numpy"):  # validates the header and every tensor's byte range
                pass
            state.update(_map_tensors(Path(file)))
        except (OSError, SafetensorError, ValueError, KeyError) as e:
            raise WeightsError(f"cannot read {file}: {e}") from e
    return state


def _map_tensors(file: Path) -> dict[str, np.ndarray]:
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    data_bytes = file.stat().st_size - 8 - size
    data = np.memmap(file, np.uint8, mode="r", offset=8 + size) if data_bytes else np.zeros(0, np.uint8)
    tensors = {}
    for key, info in header.items():
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {key} has dtype {info['dtype']}; readable: {', '.join(SAFETENSORS_DTYPES)}")
        start, end = info["data_offsets"]
        tensors[key] = data[start:end].view(SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
    return tensors


# --- names


def torch_key_to_path(key: str) -> tuple[str, ...]:
    """``down_blocks.0.resnets.1.conv1.weight`` -> ``('down_blocks_0', 'resnets_1', 'conv1', 'weight')``."""
    path: list[str] = []
    for part in key.split("."):
        if part.isdigit() and path:
            path[-1] = f"{path[-1]}_{part}"
        else:
            path.append(part)
    return tuple(path)


def path_to_torch_key(path: tuple[str, ...]) -> str:
    """Inverse of :func:`torch_key_to_path` for flax paths (leaf kernel/scale/embedding -> weight)."""
    parts = []
    for segment in path[:-1]:
        name, _, index = segment.rpartition("_")
        parts.append(f"{name}.{index}" if index.isdigit() and name in TORCH_LIST_ATTRS else segment)
    leaf = path[-1]
    parts.append("weight" if leaf in ("kernel", "scale", "embedding") else leaf)
    return ".".join(parts)


def _fit_kernel(value: np.ndarray, leaf: str, target_ndim: int) -> np.ndarray:
    """sdjax's kernels keep PyTorch's layouts (:mod:`sdjax.models.layers`): only a 1x1 conv kernel stored for a
    linear layer (the original LDM VAE attention) loses its window axes."""
    if leaf == "kernel" and value.ndim == 4 and target_ndim == 2 and value.shape[2:] == (1, 1):
        return value.reshape(value.shape[:2])
    return value


# --- conversion


def torch_to_flax(
    state: Mapping[str, np.ndarray],
    expected: Params,
    *,
    renames: Iterable[tuple[str, str]] = (),
    ignored: Iterable[str] = (),
    component: str = "model",
) -> Params:
    """Converts a PyTorch state dict to a nested flax param dict with the structure of ``expected``.

    Args:
      state: torch key -> numpy array (PyTorch layouts).
      expected: nested dict of ``jax.ShapeDtypeStruct`` (from :func:`param_shapes`).
      renames: (regex, replacement) applied in order to every torch key first (legacy names).
      ignored: regexes of torch keys that are buffers, not parameters.
    Returns:
      Nested dict of numpy arrays, same structure and shapes as ``expected``.
    Raises:
      WeightsError: listing every missing, unexpected and shape-mismatched key (the first few of each).
    """
    renames, ignored = list(renames), [re.compile(p) for p in ignored]
    targets = traverse_util.flatten_dict(expected)
    out: dict[tuple[str, ...], np.ndarray] = {}
    unexpected, mismatched, mismatched_paths = [], [], set()
    for key, value in state.items():
        if any(p.fullmatch(key) for p in ignored):
            continue
        new_key = key
        for pattern, repl in renames:
            new_key = re.sub(pattern, repl, new_key)
        path = torch_key_to_path(new_key)
        candidates = ("kernel", "scale", "embedding") if path[-1] == "weight" else (path[-1],)
        target = next((path[:-1] + (c,) for c in candidates if path[:-1] + (c,) in targets), None)
        if target is None:
            unexpected.append(key)
            continue
        value = _fit_kernel(np.asarray(value), target[-1], len(targets[target].shape))
        if value.shape != tuple(targets[target].shape):
            mismatched.append(f"{key} {tuple(value.shape)} vs model {tuple(targets[target].shape)}")
            mismatched_paths.add(target)
            continue
        out[target] = value
    missing = [path_to_torch_key(p) for p in targets if p not in out and p not in mismatched_paths]
    if missing or unexpected or mismatched:
        problems = [
            f"{len(items)} {kind} ({_short_list(items)})"
            for kind, items in (("missing", missing), ("unexpected", unexpected), ("shape-mismatched", mismatched))
            if items
        ]
        raise WeightsError(f"{component} weights do not fit its config.json: {'; '.join(problems)}")
    return traverse_util.unflatten_dict(out)


def flax_to_torch(params: Params, *, renames: Iterable[tuple[str, str]] = ()) -> dict[str, np.ndarray]:
    """Nested flax params -> PyTorch-layout state dict (inverse of :func:`torch_to_flax`)."""
    state = {}
    for path, value in traverse_util.flatten_dict(params).items():
        key = path_to_torch_key(path)
        for pattern, repl in renames:
            key = re.sub(pattern, repl, key)
        state[key] = np.ascontiguousarray(np.asarray(value))
    return state


# --- components


def component_class(class_name: str, where: str = "") -> tuple[type, str]:
    """The flax module class and library ("diffusers" / "transformers") for a diffusers/transformers class name."""
    if class_name not in COMPONENTS:
        raise WeightsError(f"unsupported component class {class_name!r}{where}; supported: {', '.join(COMPONENTS)}")
    module_name, library = COMPONENTS[class_name]
    module = __import__(module_name, fromlist=[class_name])
    return getattr(module, class_name), library


def read_component_config(folder: str | Path) -> tuple[str, dict[str, Any]]:
    """(class name, config dict) from ``folder/config.json`` (diffusers ``_class_name`` or transformers
    ``architectures``)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise WeightsError(f"{folder} has no config.json; expected a diffusers/transformers component folder")
    config = read_json(path)
    class_name = config.get("_class_name") or (config.get("architectures") or [None])[0]
    if class_name is None:
        raise WeightsError(f"{path} names no model class (_class_name or architectures)")
    return class_name, config


def param_shapes(module: Any) -> Params:
    """Parameter tree of ``module`` as ``jax.ShapeDtypeStruct`` leaves, traced without running init (or read from
    the trace cache, see :mod:`sdjax.compile_cache`, when it is on)."""
    from sdjax import compile_cache

    def trace():
        return jax.eval_shape(module.init, jax.random.key(0), *module.dummy_inputs())["params"]

    return compile_cache.cached_param_shapes(repr(module), trace)


def build_component(folder: str | Path, dtype: Any = jnp.float32) -> Any:
    """The flax module described by ``folder/config.json``, computing in ``dtype``."""
    class_name, config = read_component_config(folder)
    cls, _ = component_class(class_name, where=f" in {Path(folder) / 'config.json'}")
    try:
        return cls(config=cls.config_class.from_dict(config), dtype=dtype)
    except (TypeError, ValueError) as e:  # a field of the wrong type or value: name the file, keep the class
        raise type(e)(f"{Path(folder) / 'config.json'}: {e}") from e


def load_component(folder: str | Path, dtype: Any = jnp.float32, variant: str | None = None) -> tuple[Any, Params]:
    """Loads one component folder (config.json + safetensors) written by diffusers or transformers.

    Returns ``(module, params)``: the flax module (compute dtype ``dtype``) and its params cast to ``dtype``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"component folder {folder} does not exist")
    module = build_component(folder, dtype)
    _, library = component_class(module.config_class.class_name)
    state = read_safetensors(find_weight_files(folder, library, variant))
    params = torch_to_flax(
        state,
        param_shapes(module),
        renames=module.torch_key_renames,
        ignored=module.torch_ignored_keys,
        component=f"{module.config_class.class_name} ({folder})",
    )
    return module, to_device(params, dtype, component=f"{module.config_class.class_name} ({folder})")


def _raise_non_finite(component: str, paths: Iterable[Any], finite: Iterable[bool]) -> None:
    bad = ["/".join(str(getattr(k, "key", k)) for k in path) for path, ok in zip(paths, finite, strict=True) if not ok]
    if bad:
        raise WeightsError(f"{component}: weights with NaN or inf values: {_short_list(bad)}; the file is damaged")


def to_device(params: Params, dtype: Any, component: str | None = None) -> Params:
    """Host arrays (e.g. views of memory-mapped safetensors files) -> device arrays of ``dtype``, one copy each.

    Each tensor is copied once, on a thread per core, into a 64-byte-aligned host buffer of ``dtype`` that the
    CPU device then uses as it is (no second copy; GPUs and TPUs transfer it). The kernels keep the files'
    layouts, so the copy is a plain one (the cast included) at memory speed. With ``component``, the copy also
    checks every value and raises one :class:`WeightsError` naming the tensors that hold NaN or inf. Views of
    memory-mapped files are read with ``pread``, never through the mapping, so a load's peak memory is the
    params, not the params plus the mapped file (benchmarks/bench_sample.py)."""
    dtype = np.dtype(dtype)
    paths, leaves = zip(*jax.tree_util.tree_leaves_with_path(params), strict=True) if params else ((), ())
    copies = _thread_map(lambda x: _host_copy(x, dtype, component is not None), leaves)
    if component is not None:
        _raise_non_finite(component, paths, [finite for _, finite in copies])
    out = _thread_map(lambda c: jax.device_put(c[0]).block_until_ready(), copies)
    return jax.tree.unflatten(jax.tree.structure(params), out)


# Elements per copy step: a step's source and destination stay in cache for the finiteness check.
_COPY_CHUNK = 1 << 18
# CPU devices use a host buffer with this alignment in place instead of copying it (XLA's minimum alignment).
_DEVICE_ALIGNMENT = 64


def _host_copy(x: Any, dtype: np.dtype, check: bool) -> tuple[np.ndarray, bool]:
    """(a fresh 64-byte-aligned C-contiguous copy of ``x`` cast to ``dtype``, whether every value of ``x`` is
    finite (True when not ``check``)).

    A contiguous view of a memory-mapped file is read from the file with ``pread`` instead of through the
    mapping: the page faults of touching a mapping cost more than the copy (2.5-3 s vs 0.5 s for an SD 1.5 UNet
    in a fresh process), and the mapped pages would count toward this process's memory."""
    src = np.asarray(x)
    buffer = np.empty(src.size * dtype.itemsize + _DEVICE_ALIGNMENT, np.uint8)
    start = -buffer.ctypes.data % _DEVICE_ALIGNMENT
    out = buffer[start : start + src.size * dtype.itemsize].view(dtype).reshape(src.shape)
    where = _file_range(src) if src.flags.c_contiguous else None
    raw = out if src.dtype == dtype else np.empty(src.shape, src.dtype)
    flat_src, flat_raw, finite = src.reshape(-1), raw.reshape(-1), True
    fd = os.open(where[0], os.O_RDONLY) if where else None
    try:
        for i in range(0, src.size, _COPY_CHUNK):
            part = flat_raw[i : i + _COPY_CHUNK]
            if fd is None:
                np.copyto(part, flat_src[i : i + _COPY_CHUNK], casting="unsafe")
            elif os.preadv(fd, [part.view(np.uint8)], where[1] + i * src.dtype.itemsize) != part.nbytes:
                raise WeightsError(f"{where[0]} is shorter than its header says; the file is truncated")
            if check and finite:
                finite = bool(np.isfinite(part).all())
    finally:
        if fd is not None:
            os.close(fd)
    if raw is not out:
        np.copyto(out, raw, casting="unsafe")
    return out, finite


def _file_range(x: np.ndarray) -> tuple[str, int] | None:
    """(file, byte offset) of the data of ``x`` when it is a view of an ``np.memmap`` (np.asarray and reshapes
    drop the subclass, so the chain of bases is searched), else None."""
    base = x
    while base is not None and getattr(base, "_mmap", None) is None:
        base = getattr(base, "base", None)
    if base is None or not getattr(base, "filename", None) or not hasattr(os, "preadv"):
        return None
    mapping_offset = base.offset - base.offset % mmap.ALLOCATIONGRANULARITY  # where np.memmap's mmap starts
    mapping_start = np.frombuffer(base._mmap, np.uint8).ctypes.data
    return base.filename, mapping_offset + x.ctypes.data - mapping_start


def _thread_map(fn: Any, items: Iterable[Any]) -> list[Any]:
    """``[fn(x) for x in items]`` on a thread per core (numpy and PJRT copies release the GIL)."""
    items = list(items)
    if len(items) < 2:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(min(len(items), 2 * (os.cpu_count() or 1))) as pool:
        return list(pool.map(fn, items))


def component_config(module: Any) -> dict[str, Any]:
    """The ``config.json`` contents diffusers / transformers write for ``module``'s class and config."""
    class_name = module.config_class.class_name
    _, library = component_class(class_name)
    config = module.config.to_dict()
    if library == "diffusers":
        return {"_class_name": class_name, "_diffusers_version": DIFFUSERS_VERSION, **config}
    return {"architectures": [class_name], **config}


def save_component(module: Any, params: Params, folder: str | Path, dtype: Any = np.float32) -> None:
    """Writes ``module`` and ``params`` as a diffusers/transformers component folder (config.json + safetensors)
    that the PyTorch libraries load."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _, library = component_class(module.config_class.class_name)
    state = flax_to_torch(params, renames=getattr(module, "torch_export_renames", ()))
    state = {k: np.asarray(jax.device_get(v)).astype(dtype) for k, v in state.items()}
    file = folder / f"{WEIGHTS_NAME[library]}.safetensors"
    save_file(state, str(file), metadata={"format": "pt"})
    follow_umask(file)  # safetensors creates files 0600: other users and hosts could not read the weights
    (folder / "config.json").write_text(json.dumps(component_config(module), indent=2) + "\n")


def follow_umask(path: str | Path) -> None:
    """Gives ``path`` (a file, or a folder and everything in it) the permissions a new file of the user gets:
    0666 / 0777 less the umask. For files created by code that picks its own mode (safetensors, mkdtemp)."""
    umask = os.umask(0)
    os.umask(umask)
    path = Path(path)
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)
