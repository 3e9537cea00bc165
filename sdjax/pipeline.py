"""``StableDiffusion``: load the three networks, encode prompts, and generate images (txt2img and img2img).

The whole denoising loop (both guidance branches, the sampler update) and the VAE decode run in one compiled
function, pmapped over the local devices. Prompt, negative prompt, seed, guidance scale and eta are traced
values: changing them reuses the compiled function.
"""

from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, UnidentifiedImageError

from sdjax import parallel, samplers, schedule, tokenizer, weights

PIPELINE_CLASSES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")
# Components a diffusers SD folder may list that sdjax does not use (no safety checker: see README).
UNUSED_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")
TRACE_COUNT = 0  # how many times the sampling function was traced (compiled)
# Weight dtypes save_pretrained writes (safetensors' numpy API has no bfloat16).
_SAVE_DTYPES = {"float32": np.float32, "float16": np.float16}
NETWORKS = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel"}


# Largest image side generate() accepts (pixels): SDXL's 1024 four times over; the activations of bigger images
# do not fit an accelerator's memory, and XLA's shape arithmetic overflows far beyond.
MAX_IMAGE_SIDE = 4096
MAX_SEED = 2**63 - 1


class PipelineError(ValueError):
    """A model path or a generate() argument sdjax cannot use."""


@dataclass
class StableDiffusion:
    """Stable Diffusion: text encoder, UNet, VAE, tokenizer and noise schedule, with their params.

    Attributes:
      unet, vae, text_encoder: flax.linen modules (``unet.apply({"params": p}, x_nhwc, t, context)``).
      params: {"unet": ..., "vae": ..., "text_encoder": ...} parameter trees.
      tokenizer: a transformers ``CLIPTokenizer``.
      schedule: the :class:`sdjax.schedule.ScheduleConfig` read from ``scheduler/scheduler_config.json``.
    """

    unet: Any
    vae: Any
    text_encoder: Any
    params: dict[str, Any]
    tokenizer: Any
    schedule: schedule.ScheduleConfig
    scheduler_class: str = "DDIMScheduler"
    _replicated: dict[str, Any] = field(default_factory=dict, repr=False)
    _compiled: dict[Any, Any] = field(default_factory=dict, repr=False)
    last_timings: dict[str, float] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        dtype: Any = jnp.float32,
        variant: str | None = None,
        *,
        tokenizer_path: str | os.PathLike | None = None,
        prediction_type: str | None = None,
    ):
        """Loads Stable Diffusion from a diffusers folder (model_index.json + component folders), an sdjax training
        workdir (its latest checkpoint's EMA params) or a single-file LDM ``.safetensors`` checkpoint. A single
        file holds no tokenizer: it gets the built-in CLIP tokenizer of its family (SD 1.x pads with
        <|endoftext|>, SD 2.x with "!"), or the one in ``tokenizer_path``; v-prediction models (SD 2.x 768-v)
        need ``prediction_type="v_prediction"``, which the weights do not record.

        ``dtype`` is the params' and the compute dtype (float32 or bfloat16); the schedule and the sampler state
        stay float32. ``variant`` picks ``*.{variant}.safetensors`` files (e.g. "fp16")."""
        path = Path(path)
        if not path.exists():
            raise PipelineError(
                f"model path {path} does not exist; expected a diffusers folder, sdjax workdir or .safetensors file"
            )
        if path.is_file():
            return cls._from_single_file(path, dtype, tokenizer_path, prediction_type)
        from sdjax import checkpoint  # imports orbax: only needed for workdirs

        if checkpoint.is_workdir(path):
            return cls._from_folder(path / "model", dtype, variant, trained=checkpoint.load_trained_params(path))
        return cls._from_folder(path, dtype, variant)

    @classmethod
    def _from_single_file(cls, path: Path, dtype: Any, tokenizer_path: Any, prediction_type: str | None):
        from sdjax import single_file

        if path.suffix != ".safetensors":
            raise PipelineError(f"{path}: single-file checkpoints are read as .safetensors only (got {path.suffix!r})")
        modules, params, scheduler_config = single_file.load_single_file(path, dtype, prediction_type)
        if tokenizer_path is None:
            tok = single_file.default_tokenizer(modules["text_encoder"].config)
        else:
            tok = tokenizer.load_tokenizer(tokenizer_path)
        return cls(
            **modules,
            params=params,
            tokenizer=tok,
            schedule=schedule.ScheduleConfig.from_dict(scheduler_config),
            scheduler_class=scheduler_config.get("_class_name", "PNDMScheduler"),
        )

    @classmethod
    def _from_folder(cls, path: Path, dtype: Any, variant: str | None, trained: dict[str, Any] | None = None):
        index = _read_model_index(path)
        trained = trained or {}
        modules, params = {}, {}
        for name in NETWORKS:
            if name in trained:
                modules[name] = weights.build_component(path / name, dtype)
                params[name] = weights.to_device(trained[name], dtype)
            else:
                modules[name], params[name] = weights.load_component(path / name, dtype, variant)
        scheduler_config = path / "scheduler" / "scheduler_config.json"
        if not scheduler_config.is_file():
            raise PipelineError(f"{path} has no scheduler/scheduler_config.json")
        try:
            schedule_cfg = schedule.ScheduleConfig.from_dict(weights.read_json(scheduler_config))
        except (TypeError, ValueError) as e:
            raise PipelineError(f"{scheduler_config}: {e}") from e
        return cls(
            unet=modules["unet"],
            vae=modules["vae"],
            text_encoder=modules["text_encoder"],
            params=params,
            tokenizer=tokenizer.load_tokenizer(path / "tokenizer"),
            schedule=schedule_cfg,
            scheduler_class=index.get("scheduler", [None, "DDIMScheduler"])[1],
        )

    def save_pretrained(self, path: str | os.PathLike, dtype: str = "float32") -> None:
        """Writes a diffusers-format folder that diffusers' ``StableDiffusionPipeline.from_pretrained`` loads.

        ``dtype`` is the stored weights' dtype, "float32" or "float16" (half the size; loading casts them to the
        ``dtype`` passed to :meth:`from_pretrained`)."""
        if dtype not in _SAVE_DTYPES:
            raise PipelineError(f"cannot save weights as {dtype!r}; accepted: {', '.join(_SAVE_DTYPES)}")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for name, module in self.modules.items():
            weights.save_component(module, self.params[name], path / name, dtype=_SAVE_DTYPES[dtype])
        tokenizer.save_tokenizer(self.tokenizer, path / "tokenizer")
        (path / "scheduler").mkdir(exist_ok=True)
        scheduler = {"_class_name": self.scheduler_class, **self.schedule.to_dict()}
        (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
        index = {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": weights.DIFFUSERS_VERSION,
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", self.scheduler_class],
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
        }
        (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")

    @property
    def modules(self) -> dict[str, Any]:
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel (8 for SD: 2 ** (number of VAE blocks - 1))."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    # ------------------------------------------------------------------------------------------- prompts

    def encode_prompt(self, prompts: list[str]) -> jax.Array:
        """Prompts -> text embeddings (B, 77, D) in the text encoder's dtype; over-long prompts are truncated
        with a warning."""
        ids = tokenizer.tokenize(self.tokenizer, list(prompts))
        return _encode_text(self.text_encoder, self.params["text_encoder"], jnp.asarray(ids))

    # ------------------------------------------------------------------------------------------- generation

    def generate(
        self,
        prompts: str | list[str],
        negative_prompts: str | list[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        sampler: str = "ddim",
        seed: int = 0,
        height: int | None = None,
        width: int | None = None,
        latents: np.ndarray | jax.Array | None = None,
        eta: float = 0.0,
        *,
        num_images_per_prompt: int = 1,
        init_image: Any = None,
        strength: float = 0.75,
        use_karras_sigmas: bool | None = None,
        progress: bool = False,
    ) -> np.ndarray:
        """Text-to-image (and image-to-image with ``init_image``).

        Args:
          prompts: one prompt or a list; each gives ``num_images_per_prompt`` images.
          negative_prompts: one per prompt (or one for all); "" when None.
          guidance_scale: classifier-free guidance weight; <= 1 runs the conditional branch only.
          sampler: one of :data:`sdjax.samplers.SAMPLERS`.
          seed: image i's noise depends only on (seed, i), whatever the number of devices.
          latents: optional initial standard-normal noise (N, H/8, W/8, C), scaled by the sampler's initial sigma.
          init_image: path, PIL image or array (H, W, 3) (uint8, or float in [0, 1]) for img2img; ``strength`` in
            (0, 1] is the fraction of the schedule re-run on it.
        Returns:
          np.float32 (N, H, W, 3) in [0, 1], N = len(prompts) * num_images_per_prompt.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise PipelineError("prompts is empty; pass a string or a non-empty list of strings")
        check_generate_args(guidance_scale, eta, strength, seed, num_images_per_prompt)
        negative_prompts = _negative_prompts(negative_prompts, len(prompts))
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        negative_prompts = [p for p in negative_prompts for _ in range(num_images_per_prompt)]
        n = len(prompts)
        height, width = self._image_size(height, width)
        init = None if init_image is None else _load_image(init_image, height, width)
        plan = _plan(self.schedule, sampler, num_inference_steps, strength if init_image is not None else 1.0,
                     use_karras_sigmas)  # fmt: skip
        latent_shape = (height // self.vae_scale_factor, width // self.vae_scale_factor, self.unet.config.in_channels)
        noise = self._initial_noise(latents, seed, n, latent_shape)
        do_cfg = guidance_scale > 1.0
        context = self.encode_prompt(prompts)
        uncond = self.encode_prompt(negative_prompts) if do_cfg else context

        devices = jax.local_devices()
        d = min(len(devices), n)
        per_device = -(-n // d)
        keys = _image_keys(seed, n)
        args = [noise, context, uncond, jax.random.key_data(keys)]
        if init is not None:
            args.append(jnp.broadcast_to(init, (n, *init.shape)))
        args = [_shard(a, d, per_device) for a in args]
        scalars = _shard(jnp.array([[guidance_scale, eta]] * d * per_device, jnp.float32), d, per_device)
        fn = _generate_fn(self.unet, self.vae, plan, do_cfg, init is not None, d, progress)
        call_args = (self._replicated_params(devices[:d]), scalars, *args)
        static = (self.unet, self.vae, plan, do_cfg, init is not None, d)
        compiled, compile_s = self._compile(fn, call_args, None if progress or d > 1 else repr(static))
        start = time.perf_counter()
        images = np.asarray(compiled(*call_args), dtype=np.float32).reshape(d * per_device, height, width, 3)
        self.last_timings = {"compile_s": compile_s, "generate_s": time.perf_counter() - start, "images": n}
        if not np.isfinite(images[:n]).all():
            raise PipelineError(
                "the sampler produced non-finite (NaN/inf) images; check the weights (a float16 model in "
                "float16 can overflow: load it with dtype=float32 or bfloat16) and the latents / init image"
            )
        return images[:n]

    def _compile(self, fn: Any, args: tuple, trace_key: str | None) -> tuple[Any, float]:
        """Ahead-of-time compiles ``fn`` for these argument shapes once; returns it and the compile seconds
        (0 when compiled before in this process). ``trace_key`` (everything static about ``fn``) lets the
        on-disk trace cache skip tracing (see :mod:`sdjax.compile_cache`); None for programs it cannot hold
        (host callbacks of the progress bar, pmap)."""
        from sdjax import compile_cache

        signature = (fn, tuple((a.shape, str(a.dtype)) for a in jax.tree.leaves(args)))
        if signature in self._compiled:
            return self._compiled[signature], 0.0
        start = time.perf_counter()
        if trace_key is None:
            self._compiled[signature] = fn.lower(*args).compile()
        else:
            self._compiled[signature] = compile_cache.compile_traced(trace_key, fn, args)
        return self._compiled[signature], time.perf_counter() - start

    def _image_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        default = self.unet.config.sample_size * self.vae_scale_factor
        height = default if height is None else height
        width = default if width is None else width
        factor = self.vae_scale_factor
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise PipelineError(f"{name} must be an int (pixels), got {value!r}")
        if height % factor or width % factor or not 0 < height <= MAX_IMAGE_SIDE or not 0 < width <= MAX_IMAGE_SIDE:
            raise PipelineError(
                f"height and width must be multiples of {factor} (the VAE's downsampling factor) in "
                f"[{factor}, {MAX_IMAGE_SIDE}], got {height}x{width}"
            )
        return height, width

    def _initial_noise(self, latents: Any, seed: int, n: int, shape: tuple[int, int, int]) -> jax.Array:
        if latents is not None:
            latents = np.asarray(latents, np.float32)
            if latents.shape != (n, *shape):
                raise PipelineError(f"latents must have shape {(n, *shape)} (N, H/8, W/8, C), got {latents.shape}")
            if not np.isfinite(latents).all():
                raise PipelineError("latents contain NaN or inf; pass finite standard-normal noise")
            return jnp.asarray(latents)
        return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, _INITIAL_NOISE), shape))(_image_keys(seed, n))

    def _replicated_params(self, devices: list[Any]) -> Any:
        wanted = {"unet": self.params["unet"], "vae": self.params["vae"]}
        if len(devices) == 1:
            return wanted
        key = tuple(d.id for d in devices)
        if key not in self._replicated:  # replicate once per device set, reuse across generate() calls
            self._replicated.clear()
            self._replicated[key] = parallel.replicate(wanted, devices)
        return self._replicated[key]


# ----------------------------------------------------------------------------------------------- helpers


# Image i's random streams all derive from fold_in(key(seed), i), each under its own tag, so that the initial
# noise, the img2img posterior sample and the sampler's per-step noise are independent of one another.
_INITIAL_NOISE, _POSTERIOR, _SAMPLER = 0, 1, 2


def _image_keys(seed: int, n: int) -> jax.Array:
    """(n,) PRNG keys, key i = fold_in(key(seed), i): image i's randomness whatever the batch split."""
    return jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(n))


def _read_model_index(path: Path) -> dict[str, Any]:
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise PipelineError(
            f"{path} has no model_index.json; expected a diffusers Stable Diffusion folder or an sdjax workdir"
        )
    index = weights.read_json(index_file)
    if index.get("_class_name") not in PIPELINE_CLASSES:
        raise PipelineError(
            f"{index_file} describes a {index.get('_class_name')!r}; supported: {', '.join(PIPELINE_CLASSES)}"
        )
    for name, class_name in NETWORKS.items():
        got = (index.get(name) or [None, None])[1]
        if got != class_name:
            raise PipelineError(f"{index_file}: component {name!r} is {got!r}; sdjax supports {class_name!r} there")
    return index


def _finite_number(name: str, value: Any, low: float, high: float = float("inf")) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise PipelineError(f"{name} must be a number, got {value!r}")
    if not (np.isfinite(value) and low <= value <= high):
        bounds = f"[{low}, {high}]" if np.isfinite(high) else f"[{low}, inf)"
        raise PipelineError(f"{name} must be a finite number in {bounds}, got {value!r}")


def check_generate_args(guidance_scale: Any, eta: Any, strength: Any, seed: Any, num_images: Any) -> None:
    """PipelineError (one line) for a bad generate() argument; sample.py runs it before loading the model."""
    _finite_number("guidance_scale", guidance_scale, 0.0)
    _finite_number("eta", eta, 0.0)
    _finite_number("strength", strength, 0.0, 1.0)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise PipelineError(f"seed must be an int in [0, 2**63 - 1], got {seed!r}")
    if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) or num_images < 1:
        raise PipelineError(f"num_images_per_prompt must be an int >= 1, got {num_images!r}")


def _negative_prompts(negative_prompts: str | list[str] | None, n: int) -> list[str]:
    if negative_prompts is None:
        return [""] * n
    if isinstance(negative_prompts, str):
        return [negative_prompts] * n
    if len(negative_prompts) != n:
        raise PipelineError(f"got {len(negative_prompts)} negative prompts for {n} prompts; pass one per prompt")
    return list(negative_prompts)


def _load_image(image: Any, height: int, width: int) -> jax.Array:
    """Path / PIL image (any mode: 16-bit, palette, RGBA, grayscale) / array (H, W, 3) uint8 or float in [0, 1]
    -> (height, width, 3) float32 in [-1, 1]."""
    if isinstance(image, (str, os.PathLike)):
        image = read_image(image)
    if isinstance(image, Image.Image):
        array = np.asarray(_rgb(image).resize((width, height), Image.LANCZOS), np.float32) / 255.0
    else:
        array = np.asarray(image)
        if array.ndim != 3 or array.shape[-1] != 3:
            raise PipelineError(f"init image must be (H, W, 3), got shape {array.shape}")
        if array.dtype == np.uint8:
            array = array.astype(np.float32) / 255.0
        elif np.issubdtype(array.dtype, np.floating):
            array = array.astype(np.float32)
            if not (np.isfinite(array).all() and array.min() >= 0.0 and array.max() <= 1.0):
                raise PipelineError(
                    f"a float init image must be finite and in [0, 1], got values in [{array.min()}, {array.max()}]"
                    " (divide 0-255 data by 255, or pass uint8)"
                )
        else:
            raise PipelineError(f"init image arrays must be uint8 or float in [0, 1], got dtype {array.dtype}")
        if array.shape[:2] != (height, width):
            array = np.asarray(jax.image.resize(array, (height, width, 3), "bilinear"))
    return jnp.asarray(array * 2.0 - 1.0)


def read_image(path: str | os.PathLike) -> Image.Image:
    """Opens and fully reads an image file; PipelineError naming the file when it is not a readable image."""
    try:
        with Image.open(path) as f:
            f.load()
            return f.copy()
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise PipelineError(f"init image {path} cannot be read as an image: {e}") from e


def _rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB of any PIL mode: 16-bit and 32-bit integer / float grayscale are scaled, not clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, np.float64)
        scale = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        if image.mode == "F" and values.max() <= 1.0:
            scale = 1.0
        gray = np.clip(np.round(values / scale * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))  # transparent -> white, as viewers show
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _shard(x: jax.Array, d: int, per_device: int) -> jax.Array:
    """(N, ...) -> (d, per_device, ...), padding N by repeating the last row."""
    x = jnp.asarray(x)
    pad = d * per_device - x.shape[0]
    if pad:
        x = jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)])
    return x.reshape(d, per_device, *x.shape[1:])


@functools.lru_cache(maxsize=32)
def _plan(cfg: schedule.ScheduleConfig, sampler: str, steps: int, strength: float, karras: bool | None):
    if sampler not in samplers.SAMPLERS:
        raise PipelineError(f"unknown sampler {sampler!r}; choose one of: {', '.join(samplers.SAMPLERS)}")
    try:
        return samplers.make_plan(cfg, sampler, steps, strength=strength, use_karras_sigmas=karras)
    except ValueError as e:  # one error class for every bad generate() argument
        raise PipelineError(str(e)) from e


@functools.partial(jax.jit, static_argnums=0)
def _encode_text(text_encoder: Any, params: Any, input_ids: jax.Array) -> jax.Array:
    return text_encoder.apply({"params": params}, input_ids)


@functools.lru_cache(maxsize=16)
def _generate_fn(unet, vae, plan, do_cfg: bool, img2img: bool, num_devices: int, progress: bool):
    """The compiled sampler, pmapped over 2+ devices (jit on one): (params, [guidance, eta], noise, context,
    uncond, keys[, init]), each with a leading device axis -> images (devices, per-device batch, H, W, 3)."""
    bar = _ProgressBar(plan_length(plan), num_devices) if progress else None

    def generate(params, scalars, noise, context, uncond, key_data, init=None):
        global TRACE_COUNT
        TRACE_COUNT += 1  # Python side effect: runs once per trace, never at run time (tested)
        guidance, eta = scalars[0, 0], scalars[0, 1]
        keys = jax.random.wrap_key_data(key_data)

        def model_fn(x, t):
            if not do_cfg:
                return unet.apply({"params": params["unet"]}, x.astype(unet.dtype), t, context).astype(jnp.float32)
            out = unet.apply(
                {"params": params["unet"]},
                jnp.concatenate([x, x]).astype(unet.dtype),
                t,
                jnp.concatenate([uncond, context]),
            ).astype(jnp.float32)
            out_uncond, out_cond = jnp.split(out, 2)
            return out_uncond + guidance * (out_cond - out_uncond)

        if init is None:
            x = samplers.initial_latents(plan, noise)
        else:
            enc_keys = jax.vmap(lambda k: jax.random.fold_in(k, _POSTERIOR))(keys)
            posterior = vae.apply({"params": params["vae"]}, init.astype(vae.dtype), method=vae.encode)
            eps = jax.vmap(lambda k: jax.random.normal(k, posterior.mean.shape[1:]))(enc_keys)
            z = posterior.mean.astype(jnp.float32) + posterior.std.astype(jnp.float32) * eps
            x = samplers.noised_latents(plan, z.astype(jnp.float32) * vae.config.scaling_factor, noise)
        sampler_keys = jax.vmap(lambda k: jax.random.fold_in(k, _SAMPLER))(keys)
        x0 = samplers.sample(plan, model_fn, x, sampler_keys, eta=eta, progress=bar)
        z = x0 / vae.config.scaling_factor
        if getattr(vae.config, "shift_factor", None):
            z = z + vae.config.shift_factor
        image = vae.apply({"params": params["vae"]}, z.astype(vae.dtype), method=vae.decode)
        return jnp.clip(image.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)

    if num_devices > 1:
        return jax.pmap(generate)

    def on_one_device(params, *args):  # no replicated copy of the params: jit with the device axis of size 1
        return generate(params, *(a[0] for a in args))[None]

    return jax.jit(on_one_device)


def plan_length(plan: Any) -> int:
    """Number of model evaluations in a sampler plan."""
    return plan.num_evaluations


class _ProgressBar:
    """tqdm over the scan's steps, fed by a host callback (every device calls it; the bar shows the furthest step)."""

    def __init__(self, total: int, num_devices: int):
        self.total, self.bar = total, None

    def __call__(self, step: Any) -> None:
        from tqdm.auto import tqdm

        done = int(step) + 1
        if self.bar is None or (done == 1 and self.bar.n >= self.total):
            self.bar = tqdm(total=self.total, desc="sampling", leave=False)
        if done > self.bar.n:
            self.bar.update(done - self.bar.n)
        if self.bar.n >= self.total:
            self.bar.close()
