"""ControlNet guidance (one or several ControlNets, summed as diffusers' ``MultiControlNetModel``), as a task.

At each evaluation every ControlNet reads the batched model call (:class:`sdjax.tasks.ModelCall`): the latents
(scaled by c_in, the first C channels of the model input, so it composes with 9-channel inpainting), the timestep,
each guidance branch's own text conditioning (SDXL: and its pooled embedding and time ids) and its control image;
its residuals, times its ``controlnet_conditioning_scale`` while the step lies in [control_guidance_start,
control_guidance_end] (diffusers' ``controlnet_keep``: evaluation i of E counts when i / E >= start and
(i + 1) / E <= end) and 0 otherwise, are summed and passed to the UNet. In ``guess_mode`` the ControlNets see only
the conditional branch and the unconditional one gets no residuals, as diffusers.

Inputs: ``images``, one (B, H, W, 3) float32 in [0, 1] per ControlNet (resized as diffusers' control image
processor: Lanczos for PIL images); ``scales`` (B, E, K) float32, the per-evaluation scales. Params: one tree per
ControlNet.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from sdjax import platform, samplers
from sdjax.errors import PipelineError
from sdjax.images import load_image, read_image
from sdjax.tasks.base import ModelCall, Prepared, Run, Task
from sdjax.tasks.img2img import broadcast_image


@dataclasses.dataclass(frozen=True)
class ControlNetTask(Task):
    """modules: the ControlNets' flax modules (compute dtype), in order; guess_mode: residuals from the
    conditional branch only."""

    modules: tuple
    guess_mode: bool = False

    key: ClassVar[str] = "controlnet"

    def hooks(self, run: Run) -> samplers.Hooks:
        scales = run.arrays(self)["scales"]
        return samplers.Hooks(before_model=lambda x_in, row: (x_in, {"controlnet_scales": scales[:, row.index]}))

    def model_inputs(self, run: Run, call: ModelCall) -> dict[str, Any]:
        only_cond = self.guess_mode and len(call.branches) == 2
        x, cond, scales = call.x[..., : self.modules[0].config.in_channels], call.cond, call.extra["controlnet_scales"]
        if only_cond:  # the second half of the batch is the conditional branch
            x, cond, scales = jax.tree.map(lambda a: a[a.shape[0] // 2 :], (x, cond, scales))
        down, mid = None, None
        for k, (module, params, image) in enumerate(zip(self.modules, run.task_params(self), run.arrays(self)["images"],
                                                        strict=True)):  # fmt: skip
            image = jnp.concatenate([image] * (x.shape[0] // image.shape[0]))
            added = {name: cond.get(name) for name in ("text_embeds", "time_ids")}
            out = module.apply({"params": params}, x.astype(module.dtype), call.t, cond["encoder_hidden_states"],
                               image, 1.0, guess_mode=self.guess_mode, **added)  # fmt: skip
            scale = scales[:, k].reshape(-1, 1, 1, 1)
            d = [r * scale.astype(r.dtype) for r in out.down_block_res_samples]
            m = out.mid_block_res_sample * scale.astype(out.mid_block_res_sample.dtype)
            down = d if down is None else [a + b for a, b in zip(down, d, strict=True)]
            mid = m if mid is None else mid + m
        if only_cond:
            down, mid = [_zeros_first(r) for r in down], _zeros_first(mid)
        return {"down_block_additional_residuals": tuple(down), "mid_block_additional_residual": mid}


def prepare(
    controlnet: Any,
    control_image: Any,
    scale: Any,
    guidance_range: tuple[Any, Any],
    guess_mode: bool,
    n: int,
    size: tuple[int, int],
    plan: samplers.SamplerPlan,
    unet_config: Any,
    latent_channels: int,
) -> Prepared:
    """The ControlNet task for ``n`` images of ``size`` (height, width) under ``plan``: ControlNets (a
    :class:`sdjax.ControlNet` or a list), one control image each (path, PIL, (H, W, 3) array), scales and
    guidance start / end (one for all or one each) checked; PipelineError (one line) otherwise."""
    from sdjax.controlnet import ControlNet

    nets = _listed(controlnet)
    if controlnet is None or not all(isinstance(net, ControlNet) for net in nets):
        raise PipelineError(
            f"controlnet must be an sdjax.ControlNet or a list of them (with control_image), got {controlnet!r:.80}"
        )
    images = _listed(control_image)
    if control_image is None or len(images) != len(nets):
        got = 0 if control_image is None else len(images)
        raise PipelineError(f"got {got} control image(s) for {len(nets)} ControlNet(s); pass one per ControlNet")
    k = len(nets)
    scales = _per_net("controlnet_conditioning_scale", scale, k, 0.0)
    starts, ends = (_per_net(name, value, k, 0.0, 1.0) for name, value in
                    zip(("control_guidance_start", "control_guidance_end"), guidance_range, strict=True))  # fmt: skip
    if any(s >= e for s, e in zip(starts, ends, strict=True)):
        raise PipelineError(f"control_guidance_start {starts} must be below control_guidance_end {ends}")
    for net in nets:
        net.check_compatible(unet_config, latent_channels)
    modules = [platform.compute_module(net.module) for net in nets]
    e = plan.num_evaluations
    i = np.arange(e)[:, None]
    keep = 1.0 - ((i / e < np.asarray(starts)) | ((i + 1) / e > np.asarray(ends)))
    arrays = {
        "images": tuple(broadcast_image(load_control_image(image, *size), n) for image in images),
        "scales": jnp.broadcast_to(jnp.asarray(keep * np.asarray(scales), jnp.float32), (n, e, k)),
    }
    guess = guess_mode or any(net.config.global_pool_conditions for net in nets)
    task = ControlNetTask(tuple(modules), bool(guess))
    upcast = any(m is not net.module for m, net in zip(modules, nets, strict=True))
    return Prepared(task, arrays, [net.params for net in nets], upcast=upcast)


def _zeros_first(residual: jax.Array) -> jax.Array:
    """No residual for the unconditional branch (the first half of the batch)."""
    return jnp.concatenate([jnp.zeros_like(residual), residual])


def load_control_image(image: Any, height: int, width: int) -> jax.Array:
    """Path / PIL image / (H, W, 3) array (uint8 or float in [0, 1]) -> (height, width, 3) float32 in [0, 1]."""
    if isinstance(image, (str, os.PathLike)):
        image = read_image(image, "control image")
    return (load_image(image, height, width) + 1.0) / 2.0


def _listed(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _per_net(name: str, value: Any, k: int, low: float, high: float = float("inf")) -> list[float]:
    values = _listed(value)
    if len(values) == 1:
        values = values * k
    if len(values) != k:
        raise PipelineError(f"got {len(values)} {name} values for {k} ControlNet(s); pass one, or one per ControlNet")
    for v in values:
        ok = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and np.isfinite(v)
        if not ok or not low <= v <= high:
            bounds = f">= {low:g}" if not np.isfinite(high) else f"in [{low:g}, {high:g}]"
            raise PipelineError(f"{name} must be a finite number {bounds}, got {v!r}")
    return [float(v) for v in values]
