"""The generation core every family shares: one :class:`Request` (the generate() arguments all families take)
-> checks, sampler plan, the tasks it asks for (:mod:`sdjax.tasks`), inputs, one compiled program per shape, run
over the local devices.

A family (:mod:`sdjax.pipeline`, :mod:`sdjax.sdxl`) adds only its conditioning: ``conditions(guided, height,
width, img2img)`` -> ``{"cond": {...}, "uncond": {...}}`` of UNet keyword inputs (B = n images).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdjax import arguments, denoise, memory, parallel, platform
from sdjax import latents as latents_lib
from sdjax.errors import PipelineError
from sdjax.loading import folders
from sdjax.tasks import controlnet as controlnet_task
from sdjax.tasks import img2img, inpaint


@dataclasses.dataclass(frozen=True)
class Request:
    """The generate() arguments every family takes (each family's defaults are in its ``generate``).

    Args:
      guidance_scale: classifier-free guidance weight; <= 1 runs the conditional branch only.
      sampler: one of :data:`sdjax.samplers.SAMPLERS`.
      seed: image i's noise depends only on (seed, i), whatever the number of devices.
      latents: optional initial standard-normal noise (N, H/8, W/8, C), scaled by the sampler's initial sigma
        (with ``strength`` < 1: the noise added to the init latents).
      init_image: path, PIL image or array (H, W, 3) (uint8, or float in [0, 1]) for img2img, or diffusion
        latents (N, H/8, W/8, C); ``strength`` in (0, 1] is the fraction of the schedule re-run on it (SD's
        default 0.75; inpainting 1.0: start from noise).
      mask_image: inpainting's mask (path, PIL image, array (H, W) uint8 / bool / float in [0, 1]) of the init
        image's size; white (>= 0.5) is repainted (see :mod:`sdjax.tasks.inpaint`). Inpainting models (UNet
        in_channels 9) require it; ordinary models blend the init image outside it after every step.
      controlnet, control_image: a :class:`sdjax.ControlNet` and its control image (path, PIL, (H, W, 3) array
        in [0, 1] or uint8), or lists of them (their residuals sum); controlnet_conditioning_scale,
        control_guidance_start, control_guidance_end: one for all or one per ControlNet; guess_mode: the
        ControlNets see the conditional branch only (see :mod:`sdjax.tasks.controlnet`).
      use_karras_sigmas: Karras sigmas for the samplers with sigmas (None: the scheduler config's).
      guidance_rescale: in [0, 1], rescales the guided prediction towards the conditional one's std (Lin et al.
        2023, Sec. 3.4), as diffusers; 0 is off.
      denoising_start, denoising_end: SDXL's base -> refiner hand-off (see :meth:`sdjax.StableDiffusionXL.generate`).
      output: "image", or "latent" for the final diffusion latents (N, H/8, W/8, C) without decoding.
      scheduler_config: diffusers scheduler config fields for this call, over the model's
        (``{"timestep_spacing": "trailing"}`` for a Lightning / Hyper-SD model); see docs/samplers.md.
      progress: a progress bar over the sampler's evaluations (separately compiled, cached programs).
    """

    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    sampler: str = "ddim"
    seed: int = 0
    height: int | None = None
    width: int | None = None
    latents: Any = None
    eta: float = 0.0
    init_image: Any = None
    strength: float = 0.75
    mask_image: Any = None
    controlnet: Any = None
    control_image: Any = None
    controlnet_conditioning_scale: Any = 1.0
    control_guidance_start: float = 0.0
    control_guidance_end: float = 1.0
    guess_mode: bool = False
    use_karras_sigmas: bool | None = None
    guidance_rescale: float = 0.0
    denoising_start: float | None = None
    denoising_end: float | None = None
    output: str = "image"
    scheduler_config: dict[str, Any] | None = None
    progress: bool = False


def check_request(pipe: Any, r: Request) -> None:
    """PipelineError (one line) for an argument no task or family can take."""
    arguments.check_generate_args(r.guidance_scale, r.eta, r.strength, r.seed, 1)
    arguments.finite_number("guidance_rescale", r.guidance_rescale, 0.0, 1.0)
    arguments.check_steps(r.num_inference_steps, pipe.schedule.num_train_timesteps)
    if r.use_karras_sigmas is not None and not isinstance(r.use_karras_sigmas, bool):
        raise PipelineError(f"use_karras_sigmas must be True, False or None, got {r.use_karras_sigmas!r}")
    if r.output not in arguments.OUTPUTS:
        raise PipelineError(f"output must be one of {', '.join(map(repr, arguments.OUTPUTS))}, got {r.output!r}")
    check_unet_input(pipe.unet.config, pipe.vae.config.latent_channels, r.mask_image is not None)
    if r.mask_image is not None and r.init_image is None:
        raise PipelineError("mask_image repaints init_image: pass init_image too (an image, not latents)")
    if r.denoising_start is not None and (r.init_image is None or r.mask_image is not None):
        raise PipelineError(
            "denoising_start continues a partly denoised run: pass its latents as init_image (the output of "
            'generate(..., denoising_end=..., output="latent")), without mask_image'
        )


def generate(pipe: Any, conditions: Any, n: int, r: Request) -> np.ndarray:
    """``n`` images (or latents) of ``pipe`` for request ``r``; float32 (n, H, W, 3) in [0, 1]."""
    check_request(pipe, r)
    height, width = image_size(pipe, r)
    memory.check_host_memory(pipe.unet, pipe.vae, n, height, width)
    strength = r.strength if r.init_image is not None and r.denoising_start is None else 1.0
    schedule = arguments.call_schedule(pipe.schedule, r.scheduler_config)
    karras, start, end = r.use_karras_sigmas, r.denoising_start, r.denoising_end
    plan = arguments.plan(schedule, r.sampler, r.num_inference_steps, strength, karras, start, end)
    arguments.check_eta(r.sampler, r.eta)
    guided = r.guidance_scale > 1.0 and not pipe.embeds_guidance
    shape = latents_lib.latent_shape(pipe.vae, height, width)
    prepared = prepare_tasks(pipe, r, n, (height, width), shape, plan)
    unet, vae = (platform.compute_module(m) for m in (pipe.unet, pipe.vae))
    upcast = unet is not pipe.unet or vae is not pipe.vae or any(p.upcast for p in prepared)
    spec = denoise.DenoiseSpec(
        unet, vae, plan, guided=guided, tasks=tuple(p.task for p in prepared),
        rescale=guided and r.guidance_rescale > 0, decode=r.output == "image", upcast_params=upcast,
    )  # fmt: skip
    keys = denoise.image_keys(r.seed, n)
    inputs = {
        "noise": initial_noise(r.latents, keys, shape, pipe.vae_scale_factor),
        "keys": jax.random.key_data(keys),
        **conditions(guided, height, width, r.init_image is not None),
        "tasks": {p.task.key: p.inputs for p in prepared},
    }
    if pipe.embeds_guidance:  # LCM-distilled UNet: the guidance scale is a UNet input (traced: no recompile)
        w = jnp.full((n,), r.guidance_scale - 1.0, jnp.float32)
        inputs["cond"] = {**inputs["cond"], "timestep_cond": denoise.guidance_scale_embedding(w, pipe.embeds_guidance)}
    scalars = {name: jnp.float32(getattr(r, name)) for name in ("eta", "guidance_rescale")}
    scalars["guidance"] = jnp.float32(r.guidance_scale)
    task_params = {p.task.key: p.params for p in prepared if p.params is not None}
    return run(pipe, spec, scalars, inputs, task_params, r.progress)


def prepare_tasks(pipe: Any, r: Request, n: int, size: tuple[int, int], shape: tuple, plan: Any) -> list:
    """The request's tasks (:class:`sdjax.tasks.Prepared`), in hook order: img2img or inpainting, then ControlNet."""
    prepared = []
    if r.mask_image is not None:
        nine = folders.is_inpainting(pipe.unet.config)
        prepared.append(inpaint.prepare(r.init_image, r.mask_image, n, *size, pipe.vae_scale_factor, nine, r.strength))
    elif r.init_image is not None:
        prepared.append(img2img.prepare(r.init_image, n, *size, shape, r.denoising_start is None))
    if r.controlnet is not None or r.control_image is not None:
        prepared.append(
            controlnet_task.prepare(
                r.controlnet,
                r.control_image,
                r.controlnet_conditioning_scale,
                (r.control_guidance_start, r.control_guidance_end),
                r.guess_mode,
                n,
                size,
                plan,
                pipe.unet.config,
                pipe.vae.config.latent_channels,
            )  # fmt: skip
        )
    return prepared


def check_unet_input(unet_config: Any, latent_channels: int, inpainting: bool) -> None:
    """PipelineError unless the UNet reads what the request gives it: an inpainting UNet (in_channels 9) also
    reads the mask and the masked image's latents, which only inpainting (init_image and mask_image) provides."""
    if folders.is_inpainting(unet_config):
        if not inpainting:
            raise PipelineError(
                f"this is an inpainting model (UNet in_channels {unet_config.in_channels}): pass init_image and "
                "mask_image"
            )
        return
    if unet_config.in_channels != latent_channels:
        raise PipelineError(
            f"the UNet takes {unet_config.in_channels}-channel input and the VAE makes {latent_channels}-channel "
            "latents: the two do not belong together"
        )


def image_size(pipe: Any, r: Request) -> tuple[int, int]:
    """(height, width) in pixels: given, or from init latents, or the UNet's sample size; checked."""
    height, width = r.height, r.width
    factor = pipe.vae_scale_factor
    if img2img.is_latents(r.init_image) and height is None and width is None:
        height, width = (side * factor for side in np.shape(r.init_image)[1:3])
    default = pipe.unet.config.sample_size * factor
    height = default if height is None else height
    width = default if width is None else width
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise PipelineError(f"{name} must be an int (pixels), got {value!r}")
    side = arguments.MAX_IMAGE_SIDE
    if height % factor or width % factor or not 0 < height <= side or not 0 < width <= side:
        raise PipelineError(
            f"height and width must be multiples of {factor} (the VAE's downsampling factor) in "
            f"[{factor}, {side}], got {height}x{width}"
        )
    return height, width


def initial_noise(latents: Any, keys: jax.Array, shape: tuple[int, int, int], factor: int) -> jax.Array:
    """The run's standard-normal noise (n, h, w, C): given ``latents`` (checked), or image i's from its key."""
    n = keys.shape[0]
    if latents is None:
        return denoise.initial_noise(keys, shape)
    latents = np.asarray(latents, np.float32)
    if latents.shape != (n, *shape):
        expected = f"{(n, *shape)} (N, H/{factor}, W/{factor}, C)"
        raise PipelineError(f"latents must have shape {expected}, got {latents.shape}")
    if not np.isfinite(latents).all():
        raise PipelineError("latents contain NaN or inf; pass finite standard-normal noise")
    return jnp.asarray(latents)


def run(pipe: Any, spec: denoise.DenoiseSpec, scalars: dict, inputs: dict, task_params: dict, progress: bool):
    """Runs the compiled denoise function on the batch split over the local devices; float32 (N, H, W, 3)."""
    n = inputs["noise"].shape[0]
    # pmap spans every process's devices: a multi-process program (a training run's preview on host 0) samples
    # on one local device, which needs no other process.
    local = jax.local_device_count() if jax.process_count() == 1 else 1
    devices = jax.local_devices()[: min(local, n)]
    d, per_device = len(devices), -(-n // len(devices))
    memory.check_attention_memory(spec, devices[0], per_device, inputs["noise"].shape[1:3])
    params = replicated_params(pipe, devices, task_params)
    if d > 1:
        inputs = jax.tree.map(lambda a: parallel.shard(a, d, per_device), inputs)
    with memory.out_of_memory_as_error(n, devices[0]):
        compiled, compile_s = compile_program(pipe, spec, devices, progress, (params, scalars, inputs))
        start = time.perf_counter()
        images = np.asarray(compiled(params, scalars, inputs), dtype=np.float32)
    images = images.reshape(-1, *images.shape[-3:])[:n]
    pipe.last_timings = {"compile_s": compile_s, "generate_s": time.perf_counter() - start, "images": n}
    if not np.isfinite(images).all():
        raise PipelineError(
            "the sampler produced non-finite (NaN/inf) images; check the weights (a float16 model in "
            "float16 can overflow: load it with dtype=float32 or bfloat16) and the latents / init image"
        )
    return images


def compile_program(pipe: Any, spec: denoise.DenoiseSpec, devices: list, progress: bool, args: tuple):
    """The compiled denoise program for (spec, argument shapes, devices), compiled once per pipeline; returns
    it and the compile seconds (0 when compiled before). Single-device programs go through the on-disk trace
    cache (:mod:`sdjax.compile_cache`); pmap cannot. With ``progress``, :class:`sdjax.denoise.SteppedDenoise`."""
    from sdjax import compile_cache

    shapes = tuple((a.shape, str(a.dtype)) for a in jax.tree.leaves(args))
    key = (spec, progress, tuple(d.id for d in devices), shapes)
    if key in pipe._compiled:
        return pipe._compiled[key], 0.0
    start = time.perf_counter()
    platform.release_free_memory()  # earlier compiles' (the text encoder's) freed heap, before this one's peak

    def compile_fn(name: str, fn: Any, fn_args: tuple) -> Any:
        if len(devices) > 1:
            return fn.lower(*fn_args).compile()
        return compile_cache.compile_traced(f"{spec!r} {name}", fn, fn_args)

    if progress:  # a host loop over the steps, each program cached on disk like the one-program run
        pipe._compiled[key] = denoise.SteppedDenoise(spec, len(devices)).compile(*args, compile_fn)
    else:
        pipe._compiled[key] = compile_fn("denoise", denoise.compiled_denoise(spec, len(devices)), args)
    platform.release_free_memory()  # the compiler's freed heap: 0.3-0.4 GiB of a sample's peak on the CPU
    return pipe._compiled[key], time.perf_counter() - start


def replicated_params(pipe: Any, devices: list[Any], task_params: dict) -> Any:
    """The UNet, VAE and task (ControlNet) params, one copy per device when there are several; replicated once
    per (device set, params) and reused across generate() calls. Keyed on the params objects, so assigning new
    ``params`` (e.g. a training preview, a LoRA) replicates again."""
    wanted = {"unet": pipe.params["unet"], "vae": pipe.params["vae"], "tasks": task_params}
    if len(devices) == 1:
        return wanted
    ids = tuple(id(leaf) for leaf in jax.tree.leaves(wanted))
    key = (tuple(d.id for d in devices), ids)
    if key not in pipe._replicated:
        pipe._replicated.clear()  # the cache holds ``wanted`` too, so the ids stay unique while it is used
        pipe._replicated[key] = (wanted, parallel.replicate(wanted, devices))
    return pipe._replicated[key][1]
