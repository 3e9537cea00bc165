"""Where one UNet evaluation spends its time, by op class, in sdjax (XLA) and diffusers (PyTorch), same weights.

    python -m benchmarks.profile_unet [--repeats 3] [--batch 2] [--latent 32] [--dtype float32|bfloat16]

SD 1.5 widths, random weights shared by both libraries. sdjax: ``jax.profiler`` trace of the compiled program;
every executed HLO op (a thunk on XLA:CPU) is classed by what its fused computation holds (convolution window,
dot, reduce) and by the flax module path XLA keeps in its metadata (``.../attn1/...``, ``.../norm2/...``).
diffusers: ``torch.profiler`` self time of each aten op, classed by op name (and weight shape for convolutions).
Prints one Markdown table of milliseconds per evaluation and share of the total for each class, plus the wall
time of an unprofiled evaluation. Op times can add up to more than the wall time where ops run concurrently.
"""

from __future__ import annotations

import argparse
import collections
import copy
import glob
import gzip
import json
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import SD15_UNET, print_table
from sdjax.platform import configure_cpu

CLASSES = ("3x3 conv", "1x1 conv / dense", "attention (QK^T, softmax, AV)", "GroupNorm / LayerNorm", "elementwise",
           "transposes / copies / concat", "other")  # fmt: skip
_ATTENTION_CORE = re.compile(r"/attn[12]/(?!to_[qkv]/|to_out_0/)")
_TORCH_COPIES = frozenset(
    "aten::" + op
    for op in "copy_ clone contiguous cat permute transpose _unsafe_view reshape view empty to _to_copy".split()
)
_NORM = re.compile(r"/(norm\d?|conv_norm_out|group_norm)/")


# --- sdjax (XLA)


def _hlo_computations(hlo_text: str) -> dict[str, str]:
    """Computation name -> its body text, from an optimized HLO module dump."""
    bodies, name, lines = {}, None, []
    for line in hlo_text.splitlines():
        m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) ", line)
        if m and line.rstrip().endswith("{") and not line.startswith(" "):
            name, lines = m.group(1), []
        elif line.startswith("}") and name:
            bodies[name] = "\n".join(lines)
            name = None
        elif name:
            lines.append(line)
    return bodies


def _xla_op_classes(hlo_text: str) -> dict[str, str]:
    """HLO instruction name (as the profiler reports it) -> op class."""
    bodies = _hlo_computations(hlo_text)
    classes = {}
    for body in bodies.values():
        for line in body.splitlines():
            m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = .*? ([a-z\-]+)\(", line)
            if not m:
                continue
            name, opcode = m.groups()
            called = re.search(r"calls=%([\w.\-]+)", line)
            inner = bodies.get(called.group(1), "") if called else ""
            op_name = (re.search(r'op_name="([^"]*)"', line) or re.search(r'op_name="([^"]*)"', inner) or [None, ""])[1]
            classes[name] = _classify_xla(opcode, line + "\n" + inner, op_name)
    return classes


def _classify_xla(opcode: str, text: str, op_name: str) -> str:
    if "im2col_conv" in op_name:  # sdjax.models.layers: a CPU conv as patches + matmul
        return "3x3 conv"
    if " convolution(" in text:
        window = re.search(r"window=\{size=([\dx]+)", text)
        return "1x1 conv / dense" if window is None or set(window.group(1).split("x")) == {"1"} else "3x3 conv"
    if opcode in ("copy", "transpose", "concatenate", "bitcast", "copy-start", "copy-done") or re.search(
        r"ROOT %[\w.\-]+ = \S+ (transpose|copy|concatenate)\(", text
    ):
        return "transposes / copies / concat"
    if _ATTENTION_CORE.search(op_name):
        return "attention (QK^T, softmax, AV)"
    if " dot(" in text:
        return "1x1 conv / dense"
    if _NORM.search(op_name):
        return "GroupNorm / LayerNorm"
    if opcode in ("fusion", "add", "multiply", "subtract", "divide", "exponential", "logistic", "broadcast"):
        return "elementwise"
    return "other"


def profile_sdjax(params, x, t, context, dtype, repeats: int) -> tuple[dict[str, float], float]:
    """(op class -> ms per evaluation, unprofiled wall ms per evaluation) of sdjax's jitted UNet."""
    from sdjax.models.unet import UNet2DConditionConfig, UNet2DConditionModel

    unet = UNet2DConditionModel(UNet2DConditionConfig.from_dict(dict(SD15_UNET)), dtype=dtype)
    params = jax.device_put(jax.tree.map(lambda a: np.asarray(a).astype(dtype), params))
    apply = jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, c))
    compiled = apply.lower(params, x, t, context).compile()
    classes = _xla_op_classes(compiled.as_text())
    jax.block_until_ready(compiled(params, x, t, context))
    wall = _min_wall(lambda: jax.block_until_ready(compiled(params, x, t, context)), repeats)
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp)
        for _ in range(repeats):
            jax.block_until_ready(compiled(params, x, t, context))
        jax.profiler.stop_trace()
        (trace,) = glob.glob(f"{tmp}/**/*.trace.json.gz", recursive=True)
        events = json.load(gzip.open(trace))["traceEvents"]
    totals: dict[str, float] = collections.defaultdict(float)
    unknown = set()
    for e in events:
        op = (e.get("args") or {}).get("hlo_op")
        if e.get("ph") != "X" or op is None or e["name"].startswith("end:"):
            continue
        if op not in classes:
            unknown.add(op)
        totals[classes.get(op, "other")] += e["dur"] / 1e3 / repeats
    if unknown:
        print(f"(sdjax: {len(unknown)} profiled ops not found in the HLO, counted as other: {sorted(unknown)[:5]})")
    return dict(totals), wall


# --- diffusers (PyTorch)


def _classify_torch(name: str, shapes: list) -> str | None:
    if name in ("aten::mkldnn_convolution", "aten::_convolution", "aten::convolution", "aten::conv2d"):
        weight = shapes[1] if len(shapes) > 1 else []
        return "1x1 conv / dense" if len(weight) == 4 and weight[2:] == [1, 1] else "3x3 conv"
    if "scaled_dot_product" in name or name in ("aten::baddbmm", "aten::bmm", "aten::_softmax", "aten::softmax"):
        return "attention (QK^T, softmax, AV)"
    if name in ("aten::addmm", "aten::mm", "aten::linear", "aten::matmul"):
        return "1x1 conv / dense"
    if name in ("aten::native_group_norm", "aten::native_layer_norm", "aten::group_norm", "aten::layer_norm"):
        return "GroupNorm / LayerNorm"
    if name in _TORCH_COPIES:
        return "transposes / copies / concat"
    if name.startswith("aten::"):
        return "elementwise"
    return None


def profile_diffusers(torch_unet, x, t, context, dtype, repeats: int) -> tuple[dict[str, float], float]:
    """(op class -> ms per evaluation, unprofiled wall ms per evaluation) of diffusers' UNet, self time per aten op."""
    import torch

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[np.dtype(dtype).name]
    model = copy.deepcopy(torch_unet).to(torch_dtype) if torch_dtype != torch.float32 else torch_unet
    xt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()).to(torch_dtype)
    ct, tt = torch.from_numpy(np.asarray(context)).to(torch_dtype), torch.from_numpy(np.asarray(t))
    with torch.no_grad():
        model(xt, tt, ct)
        wall = _min_wall(lambda: model(xt, tt, ct), repeats)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(repeats):
                model(xt, tt, ct)
    totals: dict[str, float] = collections.defaultdict(float)
    for avg in prof.key_averages(group_by_input_shape=True):
        cls = _classify_torch(avg.key, avg.input_shapes or [])
        if cls is not None:
            totals[cls] += avg.self_cpu_time_total / 1e3 / repeats
    return dict(totals), wall


def _min_wall(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def sd15_unet_weights():
    """diffusers SD 1.5 UNet with random weights (seed 0) and the same weights as an sdjax param tree (numpy)."""
    import torch
    from diffusers import UNet2DConditionModel

    from sdjax.models.unet import UNet2DConditionConfig
    from sdjax.models.unet import UNet2DConditionModel as FlaxUNet
    from sdjax.weights import param_shapes, torch_to_flax

    torch.manual_seed(0)
    torch_unet = UNet2DConditionModel(**SD15_UNET).eval()
    state = {k: v.numpy() for k, v in torch_unet.state_dict().items()}
    params = torch_to_flax(state, param_shapes(FlaxUNet(UNet2DConditionConfig.from_dict(dict(SD15_UNET)))))
    return torch_unet, params


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args()
    import os

    import torch

    torch_unet, params = sd15_unet_weights()
    b, s = args.batch, args.latent
    dtype = jnp.dtype(args.dtype)
    x = np.random.default_rng(0).standard_normal((b, s, s, 4)).astype(np.float32)
    context = np.random.default_rng(1).standard_normal((b, 77, 768)).astype(np.float32)
    t = np.full((b,), 500, np.int32)
    jax_ms, jax_wall = profile_sdjax(params, x.astype(dtype), t, context.astype(dtype), dtype, args.repeats)
    torch_ms, torch_wall = profile_diffusers(torch_unet, x, t, context, dtype, args.repeats)
    jax_total, torch_total = sum(jax_ms.values()), sum(torch_ms.values())
    print_table(
        f"SD 1.5 UNet, batch {b}, {s}x{s} latents, {args.dtype}, CPU ({torch.get_num_threads()} torch threads), "
        f"load average {os.getloadavg()[0]:.2f}; ms per evaluation (share of the op total), "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
        [
            (
                cls,
                f"diffusers {torch_ms.get(cls, 0):7.1f} ({torch_ms.get(cls, 0) / torch_total:4.0%}) | "
                f"sdjax {jax_ms.get(cls, 0):7.1f} ({jax_ms.get(cls, 0) / jax_total:4.0%})",
            )  # fmt: skip
            for cls in CLASSES
        ]
        + [
            ("sum of op times", f"diffusers {torch_total:7.1f} | sdjax {jax_total:7.1f}"),
            ("wall time, unprofiled (min)", f"diffusers {torch_wall:7.1f} | sdjax {jax_wall:7.1f}"),
        ],
    )


if __name__ == "__main__":
    configure_cpu()
    main()
