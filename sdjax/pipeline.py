"""``StableDiffusion``: the public pipeline class over the loaders, the latent codec and the denoise function.

The whole denoising loop (both guidance branches, the sampler update) and the VAE decode run in one compiled
function (:mod:`sdjax.denoise`), pmapped over the local devices. Prompt, negative prompt, seed, guidance scale
and eta are traced values: changing them reuses the compiled function.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdjax import denoise, loading, parallel, platform, samplers, schedule, tokenizer
from sdjax import latents as latents_lib
from sdjax.errors import PipelineError
from sdjax.images import load_image, read_image
from sdjax.loading import folders, lora, textual_inversion

__all__ = ["MAX_IMAGE_SIDE", "MAX_SEED", "PipelineError", "StableDiffusion", "check_generate_args", "read_image"]

OUTPUTS = ("image", "latent")  # what generate() returns: decoded images, or the final diffusion latents
# Weight dtypes save_pretrained writes (safetensors' numpy API has no bfloat16).
_SAVE_DTYPES = {"float32": np.float32, "float16": np.float16}
# Largest image side generate() accepts (pixels): SDXL's 1024 four times over; the activations of bigger images
# do not fit an accelerator's memory, and XLA's shape arithmetic overflows far beyond.
MAX_IMAGE_SIDE = 4096
MAX_SEED = 2**63 - 1


class DiffusionPipeline:
    """What every family's pipeline shares: the generation core over :func:`sdjax.denoise.denoise` (argument
    checks, plan, noise, init image or latents, one compiled program per shape, devices, memory checks) and
    folder writing. A family class (:class:`StableDiffusion`, :class:`sdjax.sdxl.StableDiffusionXL`) adds its
    networks, its prompt encoding (the UNet's conditioning inputs) and its ``generate`` signature."""

    unet: Any
    vae: Any
    params: dict[str, Any]
    schedule: schedule.ScheduleConfig
    scheduler_class: str
    _replicated: dict[str, Any]
    _compiled: dict[Any, Any]
    last_timings: dict[str, float]
    _lora: Any  # add-ons: the loaded LoRAs (sdjax.loading.lora.LoraState) or None

    @property
    def modules(self) -> dict[str, Any]:
        """The networks by component name ("unet", "vae", "text_encoder", ...)."""
        raise NotImplementedError  # each family lists its own

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel (8 for SD), the VAE's ``downsampling_factor``."""
        return self.vae.config.downsampling_factor

    # ------------------------------------------------------------------------------------------- add-ons
    # LoRA and textual inversion: thin methods over sdjax.loading.lora / .textual_inversion ("params in, params
    # out"), mutating the pipeline as diffusers does. A LoRA is merged into the params (see lora.py's docstring).

    def load_lora_weights(self, path: str | os.PathLike, scale: float = 1.0, adapter_name: str | None = None) -> None:
        """Loads a kohya / A1111 or diffusers / PEFT LoRA ``.safetensors`` file (or a folder holding
        ``pytorch_lora_weights.safetensors``) as adapter ``adapter_name`` (default ``default_N``) and makes it the
        only active one, with weight ``scale`` (as diffusers). Nothing changes when it raises PipelineError."""
        state = self._lora or lora.LoraState(base=dict(self.params))
        name = lora.default_adapter_name(self._lora) if adapter_name is None else adapter_name
        adapter = lora.read_adapter(path, name, self.modules, state.base)
        self._set_lora(lora.add_adapter(state, adapter, scale))

    def set_adapters(self, names: str | list[str], weights: float | list[float] | None = None) -> None:
        """Activates exactly the LoRAs ``names`` with ``weights`` (one per name, one for all, None: 1.0), as
        diffusers' ``set_adapters``; re-merges from the original params (no recompile)."""
        self._set_lora(lora.set_adapters(self._lora, names, weights))

    def unload_lora_weights(self) -> None:
        """Removes every LoRA: the params become the ones loaded before the first LoRA (the same arrays)."""
        if self._lora is not None:
            self.params, self._lora = dict(self._lora.base), None

    @property
    def active_adapters(self) -> dict[str, float]:
        """The active LoRAs and their weights."""
        return dict(self._lora.active) if self._lora else {}

    def _set_lora(self, state: lora.LoraState) -> None:
        self.params, self._lora = lora.merged_params(state), state

    def load_textual_inversion(self, path: str | os.PathLike, token: str | None = None) -> None:
        """Loads an A1111 (``emb_params``) or diffusers (``{token: vectors}``) embedding ``.safetensors`` (SDXL:
        its ``clip_l`` / ``clip_g`` parts into the matching text encoders): each tokenizer gets ``token``
        (default: the diffusers file's token, the A1111 file's name) and, for an n-vector embedding,
        ``token_1 .. token_{n-1}``; each text encoder's embedding table grows by n rows. Prompts containing
        ``token`` use all n vectors (see :func:`textual_inversion.expand_prompt`). Nothing changes when it
        raises PipelineError."""
        read = [
            (encoder, tokenizer_name, textual_inversion.read_embedding(
                path, token, self._tokenizer(tokenizer_name), getattr(self, encoder), part
            ))
            for encoder, tokenizer_name, part in self.text_encoder_slots
        ]  # fmt: skip
        for encoder, tokenizer_name, (tokens, vectors) in read:
            tok = self._tokenizer(tokenizer_name)
            module, params = textual_inversion.grow_token_embedding(
                getattr(self, encoder), self.params[encoder], tok, tokens, vectors
            )
            if self._lora is not None:  # a later re-merge starts from the base params: they need the new rows too
                _, base = textual_inversion.grow_token_embedding(
                    getattr(self, encoder), self._lora.base[encoder], tok, tokens, vectors
                )
                self._lora = lora.with_base(self._lora, encoder, base)
            setattr(self, encoder, module)
            self.params = {**self.params, encoder: params}
            self._set_tokenizer(tokenizer_name, textual_inversion.add_tokens(tok, tokens))

    @property
    def text_encoder_slots(self) -> list[tuple[str, str, str | None]]:
        """(text encoder attribute, tokenizer name, SDXL embedding part) per text encoder of the pipeline."""
        raise NotImplementedError  # each family lists its own

    def _tokenizer(self, name: str) -> Any:
        raise NotImplementedError

    def _set_tokenizer(self, name: str, tok: Any) -> None:
        raise NotImplementedError

    def _sample(
        self,
        conditions: Any,
        n: int,
        *,
        num_inference_steps: int,
        guidance_scale: float,
        sampler: str,
        seed: int,
        height: int | None,
        width: int | None,
        latents: Any,
        eta: float,
        init_image: Any,
        strength: float,
        use_karras_sigmas: bool | None,
        progress: bool,
        guidance_rescale: float = 0.0,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        output: str = "image",
    ) -> np.ndarray:
        """The generation core: ``n`` images (or latents), conditioned by ``conditions(guided, height, width)``, a
        family's function returning ``{"cond": {...}, "uncond": {...}}`` of UNet keyword inputs (B = n, the
        prompts already repeated per image). Other arguments as ``StableDiffusion.generate``."""
        _check_unet_input(self.unet.config, self.vae.config.latent_channels)
        check_generate_args(guidance_scale, eta, strength, seed, 1)
        _finite_number("guidance_rescale", guidance_rescale, 0.0, 1.0)
        if use_karras_sigmas is not None and not isinstance(use_karras_sigmas, bool):
            raise PipelineError(f"use_karras_sigmas must be True, False or None, got {use_karras_sigmas!r}")
        if output not in OUTPUTS:
            raise PipelineError(f"output must be one of {', '.join(map(repr, OUTPUTS))}, got {output!r}")
        init_latents = _is_latents(init_image)
        if init_latents and height is None and width is None:
            height, width = (side * self.vae_scale_factor for side in np.shape(init_image)[1:3])
        height, width = self._image_size(height, width)
        self._check_host_memory(n, height, width)
        img2img = init_image is not None
        if denoising_start is not None and not img2img:
            raise PipelineError(
                "denoising_start continues a partly denoised run: pass its latents as init_image (the output of "
                'generate(..., denoising_end=..., output="latent"))'
            )
        plan = _plan(
            self.schedule,
            sampler,
            num_inference_steps,
            strength if img2img and denoising_start is None else 1.0,  # denoising_start replaces strength
            use_karras_sigmas,
            denoising_start,
            denoising_end,
        )
        guided = guidance_scale > 1.0
        unet, vae = (_compute_module(m) for m in (self.unet, self.vae))
        spec = denoise.DenoiseSpec(
            unet,
            vae,
            plan,
            guided=guided,
            img2img=img2img,
            init_latents=init_latents,
            add_noise=denoising_start is None,
            rescale=guided and guidance_rescale > 0,
            decode=output == "image",
            upcast_params=unet is not self.unet or vae is not self.vae,
        )
        keys = denoise.image_keys(seed, n)
        shape = latents_lib.latent_shape(self.vae, height, width)
        inputs = {
            "noise": self._initial_noise(latents, keys, shape),
            "keys": jax.random.key_data(keys),
            **conditions(guided, height, width),
        }
        if img2img:
            inputs["init"] = self._init_input(init_image, n, height, width, shape if init_latents else None)
        scalars = {
            "guidance": jnp.float32(guidance_scale),
            "eta": jnp.float32(eta),
            "guidance_rescale": jnp.float32(guidance_rescale),
        }
        return self._run(spec, scalars, inputs, progress)

    def _init_input(self, init_image: Any, n: int, height: int, width: int, latent_shape: tuple | None) -> jax.Array:
        """The img2img start, (n, H, W, 3) images in [-1, 1], or (n, h, w, C) latents when ``latent_shape``."""
        if latent_shape is None:
            init = load_image(init_image, height, width)
            return jnp.broadcast_to(init, (n, *init.shape))
        init = np.asarray(init_image, np.float32)
        if init.shape[1:] != latent_shape or init.shape[0] not in (1, n):
            raise PipelineError(
                f"init latents must have shape ({n}, {', '.join(map(str, latent_shape))}) (or a leading 1) for "
                f"{n} images of {height}x{width}, got {init.shape}"
            )
        if not np.isfinite(init).all():
            raise PipelineError("init latents contain NaN or inf")
        return jnp.broadcast_to(jnp.asarray(init), (n, *latent_shape))

    def _run(self, spec: denoise.DenoiseSpec, scalars: dict, inputs: dict, progress: bool) -> np.ndarray:
        """Runs the compiled denoise function on the batch split over the local devices; float32 (N, H, W, 3)."""
        n = inputs["noise"].shape[0]
        devices = jax.local_devices()[: min(jax.local_device_count(), n)]
        d, per_device = len(devices), -(-n // len(devices))
        _check_memory(spec, devices[0], per_device, inputs["noise"].shape[1:3])
        params = self._replicated_params(devices)
        if d > 1:
            inputs = jax.tree.map(lambda a: parallel.shard(a, d, per_device), inputs)
        with _out_of_memory_as_error(n, devices[0]):
            compiled, compile_s = self._compile(spec, devices, progress, (params, scalars, inputs))
            start = time.perf_counter()
            images = np.asarray(compiled(params, scalars, inputs), dtype=np.float32)
        images = images.reshape(-1, *images.shape[-3:])[:n]
        self.last_timings = {"compile_s": compile_s, "generate_s": time.perf_counter() - start, "images": n}
        if not np.isfinite(images).all():
            raise PipelineError(
                "the sampler produced non-finite (NaN/inf) images; check the weights (a float16 model in "
                "float16 can overflow: load it with dtype=float32 or bfloat16) and the latents / init image"
            )
        return images

    def _compile(self, spec: denoise.DenoiseSpec, devices: list, progress: bool, args: tuple) -> tuple[Any, float]:
        """The compiled denoise program for (spec, argument shapes, devices), compiled once per pipeline; returns
        it and the compile seconds (0 when compiled before). Single-device programs without a progress bar go
        through the on-disk trace cache (:mod:`sdjax.compile_cache`); pmap and host callbacks cannot."""
        from sdjax import compile_cache

        shapes = tuple((a.shape, str(a.dtype)) for a in jax.tree.leaves(args))
        key = (spec, progress, tuple(d.id for d in devices), shapes)
        if key in self._compiled:
            return self._compiled[key], 0.0
        start = time.perf_counter()
        platform.release_free_memory()  # earlier compiles' (the text encoder's) freed heap, before this one's peak
        fn = denoise.compiled_denoise(spec, len(devices), progress)
        if progress or len(devices) > 1:
            self._compiled[key] = fn.lower(*args).compile()
        else:
            self._compiled[key] = compile_cache.compile_traced(repr(spec), fn, args)
        platform.release_free_memory()  # the compiler's freed heap: 0.3-0.4 GiB of a sample's peak on the CPU
        return self._compiled[key], time.perf_counter() - start

    def _image_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        factor = self.vae_scale_factor
        default = self.unet.config.sample_size * factor
        height = default if height is None else height
        width = default if width is None else width
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise PipelineError(f"{name} must be an int (pixels), got {value!r}")
        if height % factor or width % factor or not 0 < height <= MAX_IMAGE_SIDE or not 0 < width <= MAX_IMAGE_SIDE:
            raise PipelineError(
                f"height and width must be multiples of {factor} (the VAE's downsampling factor) in "
                f"[{factor}, {MAX_IMAGE_SIDE}], got {height}x{width}"
            )
        return height, width

    def _check_host_memory(self, n: int, height: int, width: int) -> None:
        """PipelineError when the inputs and outputs of ``n`` images alone (text embeddings of both branches,
        latents, float32 images on device and host) exceed the host's memory."""
        h, w, c = latents_lib.latent_shape(self.vae, height, width)
        context = max(self.unet.config.cross_attention_dims())
        per_image = 4 * (2 * tokenizer.MAX_LENGTH * context + 4 * h * w * c + 2 * height * width * 3)
        have = host_memory_bytes()
        if have is not None and n * per_image > have:
            raise PipelineError(
                f"{n} images of {height}x{width} need more than the host's {have / 2**30:.1f} GiB for their inputs "
                f"and outputs alone ({n * per_image / 2**30:.1f} GiB); generate them in smaller batches"
            )

    def _initial_noise(self, latents: Any, keys: jax.Array, shape: tuple[int, int, int]) -> jax.Array:
        n = keys.shape[0]
        if latents is None:
            return denoise.initial_noise(keys, shape)
        latents = np.asarray(latents, np.float32)
        if latents.shape != (n, *shape):
            f = self.vae_scale_factor
            raise PipelineError(f"latents must have shape {(n, *shape)} (N, H/{f}, W/{f}, C), got {latents.shape}")
        if not np.isfinite(latents).all():
            raise PipelineError("latents contain NaN or inf; pass finite standard-normal noise")
        return jnp.asarray(latents)

    def _replicated_params(self, devices: list[Any]) -> Any:
        """The UNet and VAE params, one copy per device when there are several; replicated once per (device set,
        params) and reused across generate() calls. Keyed on the params objects, so assigning new ``params``
        (e.g. a training preview, a LoRA) replicates again."""
        wanted = {"unet": self.params["unet"], "vae": self.params["vae"]}
        if len(devices) == 1:
            return wanted
        key = (tuple(d.id for d in devices), id(wanted["unet"]), id(wanted["vae"]))
        if key not in self._replicated:
            self._replicated.clear()  # the cache holds ``wanted`` too, so the ids stay unique while it is used
            self._replicated[key] = (wanted, parallel.replicate(wanted, devices))
        return self._replicated[key][1]

    def _write_folder(self, path: str | os.PathLike, dtype: str, layout: Any, tokenizers: dict, options: dict) -> None:
        if dtype not in _SAVE_DTYPES:
            raise PipelineError(f"cannot save weights as {dtype!r}; accepted: {', '.join(_SAVE_DTYPES)}")
        if Path(path).exists() and not Path(path).is_dir():
            raise PipelineError(f"{path} is a file; save_pretrained writes a folder")
        folders.write_model_folder(
            Path(path),
            {name: (module, self.params[name]) for name, module in self.modules.items()},
            scheduler_config={"_class_name": self.scheduler_class, **self.schedule.to_dict()},
            dtype=_SAVE_DTYPES[dtype],
            layout=layout,
            tokenizers=tokenizers,
            options=options,
        )


@dataclass
class StableDiffusion(DiffusionPipeline):
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
    _lora: lora.LoraState | None = field(default=None, repr=False)  # add-ons: the loaded LoRAs

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
        c = loading.load(
            path, dtype, variant, tokenizer_path=tokenizer_path, prediction_type=prediction_type, family="sd"
        )
        return cls(**c.modules, params=c.params, tokenizer=c.tokenizer, schedule=c.schedule,
                   scheduler_class=c.scheduler_class)  # fmt: skip

    def save_pretrained(self, path: str | os.PathLike, dtype: str = "float32") -> None:
        """Writes a diffusers-format folder that diffusers' ``StableDiffusionPipeline.from_pretrained`` loads.

        ``dtype`` is the stored weights' dtype, "float32" or "float16" (half the size; loading casts them to the
        ``dtype`` passed to :meth:`from_pretrained`)."""
        self._write_folder(path, dtype, folders.SD, {"tokenizer": self.tokenizer}, {})

    @property
    def modules(self) -> dict[str, Any]:
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}

    @property
    def text_encoder_slots(self) -> list[tuple[str, str, str | None]]:
        return [("text_encoder", "tokenizer", None)]

    def _tokenizer(self, name: str) -> Any:
        return self.tokenizer

    def _set_tokenizer(self, name: str, tok: Any) -> None:
        self.tokenizer = tok

    # ------------------------------------------------------------------------------------------- prompts

    def encode_prompt(self, prompts: list[str], clip_skip: int | None = None) -> jax.Array:
        """Prompts -> text embeddings (B, 77, D) in the text encoder's dtype; over-long prompts are truncated
        with a warning. ``clip_skip`` k >= 1 takes the output of the k-th layer from the end (then the final
        layer norm), as diffusers."""
        prompts = [textual_inversion.expand_prompt(self.tokenizer, p) for p in prompts]
        ids = tokenizer.tokenize(self.tokenizer, prompts)
        layer = None if clip_skip is None else -(_check_clip_skip(clip_skip, self.text_encoder) + 1)
        return _encode_text(self.text_encoder, self.params["text_encoder"], jnp.asarray(ids), layer)

    def _conditions(
        self,
        prompts: list[str],
        negative_prompts: list[str],
        guided: bool,
        clip_skip: int | None = None,
        embeds: tuple[jax.Array | None, jax.Array | None] = (None, None),
    ) -> dict[str, Any]:
        """The UNet's conditioning inputs of the prompts (and, guided, of the negative prompts); ``embeds`` (cond,
        uncond) (B, T, D), where not None, stand in for the encoded prompts / negative prompts."""
        cond, uncond = embeds
        conditions = {
            "cond": {"encoder_hidden_states": self.encode_prompt(prompts, clip_skip) if cond is None else cond}
        }
        if guided:
            uncond = self.encode_prompt(negative_prompts, clip_skip) if uncond is None else uncond
            conditions["uncond"] = {"encoder_hidden_states": uncond}
        return conditions

    # ------------------------------------------------------------------------------------------- generation

    def generate(
        self,
        prompts: str | list[str] | None = None,
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
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        output: str = "image",
        progress: bool = False,
        prompt_embeds: np.ndarray | jax.Array | None = None,
        negative_prompt_embeds: np.ndarray | jax.Array | None = None,
    ) -> np.ndarray:
        """Text-to-image (and image-to-image with ``init_image``).

        Args:
          prompts: one prompt or a list; each gives ``num_images_per_prompt`` images.
          negative_prompts: one per prompt (or one for all); "" when None.
          prompt_embeds: instead of ``prompts``, their text embeddings (B, 77, D) float (as :meth:`encode_prompt`
            returns, or interpolated between two of them); each gives ``num_images_per_prompt`` images.
          negative_prompt_embeds: with ``prompt_embeds``, the negative prompts' embeddings of the same shape;
            when None, ``negative_prompts`` are encoded (as diffusers).
          guidance_scale: classifier-free guidance weight; <= 1 runs the conditional branch only.
          sampler: one of :data:`sdjax.samplers.SAMPLERS`.
          seed: image i's noise depends only on (seed, i), whatever the number of devices.
          latents: optional initial standard-normal noise (N, H/8, W/8, C), scaled by the sampler's initial sigma.
          init_image: path, PIL image or array (H, W, 3) (uint8, or float in [0, 1]) for img2img, or diffusion
            latents (N, H/8, W/8, C); ``strength`` in (0, 1] is the fraction of the schedule re-run on it.
          guidance_rescale: in [0, 1], rescales the guided prediction towards the conditional one's std (Lin et
            al. 2023, Sec. 3.4), as diffusers; 0 is off.
          clip_skip: use the text encoder's k-th layer from the end (k >= 1), as diffusers.
          output: "image", or "latent" for the final diffusion latents (N, H/8, W/8, C) without decoding.
        Returns:
          np.float32 (N, H, W, 3) in [0, 1], N = len(prompts) (or len(prompt_embeds)) * num_images_per_prompt.
        """
        check_generate_args(guidance_scale, eta, strength, seed, num_images_per_prompt)
        embeds = _prompt_embeds(prompts, prompt_embeds, negative_prompt_embeds, self.text_encoder)
        prompts = _prompt_list("prompts", prompts) if embeds[0] is None else [""] * len(embeds[0])
        negative_prompts = _negative_prompts(negative_prompts, len(prompts))

        def conditions(guided: bool, height: int, width: int) -> dict[str, Any]:  # after the batch-size checks
            texts = (_repeat(p, num_images_per_prompt) for p in (prompts, negative_prompts))
            repeated = tuple(None if e is None else jnp.repeat(e, num_images_per_prompt, axis=0) for e in embeds)
            return self._conditions(*texts, guided, clip_skip, repeated)

        return self._sample(
            conditions,
            len(prompts) * num_images_per_prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            sampler=sampler,
            seed=seed,
            height=height,
            width=width,
            latents=latents,
            eta=eta,
            init_image=init_image,
            strength=strength,
            use_karras_sigmas=use_karras_sigmas,
            progress=progress,
            guidance_rescale=guidance_rescale,
            output=output,
        )


# ----------------------------------------------------------------------------------------------- arguments


def host_memory_bytes() -> int | None:
    """Physical RAM of this host; None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def device_memory_bytes(device: Any) -> int | None:
    """Memory of ``device``: the allocator's limit on accelerators, physical RAM on the CPU; None if unknown."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return host_memory_bytes() if device.platform == "cpu" else None


def _check_memory(spec: denoise.DenoiseSpec, device: Any, per_device: int, latent_hw: tuple[int, int]) -> None:
    """PipelineError, before compiling, when the attention scores alone cannot fit the device (unfused attention
    only: XLA's; cuDNN flash attention holds no score matrix)."""
    from sdjax.models.layers import attention_implementation

    if attention_implementation(spec.unet.dtype) is not None:
        return
    batch = per_device * (2 if spec.guided else 1)
    need, have = denoise.attention_scores_bytes(spec.unet, batch, *latent_hw), device_memory_bytes(device)
    if have is not None and need > have:
        f = spec.vae.config.downsampling_factor
        raise PipelineError(
            f"{per_device} image(s) of {latent_hw[0] * f}x{latent_hw[1] * f} per device need at least "
            f"{need / 2**30:.1f} GiB for the UNet's attention on {device.platform}, which has {have / 2**30:.1f} "
            "GiB; use a smaller height/width or fewer images"
        )


@contextlib.contextmanager
def _out_of_memory_as_error(n: int, device: Any):
    """XLA's RESOURCE_EXHAUSTED (compile or run) -> one PipelineError line."""
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        raise PipelineError(
            f"out of memory on {device.platform} generating {n} image(s): use a smaller height/width, fewer "
            "images, or dtype=bfloat16"
        ) from e


def _check_unet_input(unet_config: Any, latent_channels: int) -> None:
    """PipelineError unless the UNet denoises the VAE's latents alone: an inpainting UNet also reads the mask and
    the masked image's latents, which only inpainting (init_image and mask_image) provides."""
    if folders.is_inpainting(unet_config):
        raise PipelineError(
            f"this is an inpainting model (UNet in_channels {unet_config.in_channels}): pass init_image and mask_image"
        )
    if unet_config.in_channels != latent_channels:
        raise PipelineError(
            f"the UNet takes {unet_config.in_channels}-channel input and the VAE makes {latent_channels}-channel "
            "latents: the two do not belong together"
        )


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


def _prompt_list(name: str, prompts: Any) -> list[str]:
    """A string or a non-empty list of strings -> list; PipelineError otherwise."""
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts) or not prompts:
        raise PipelineError(f"{name} must be a string or a non-empty list of strings, got {prompts!r:.80}")
    return list(prompts)


def _prompt_embeds(prompts: Any, prompt_embeds: Any, negative_prompt_embeds: Any, text_encoder: Any) -> tuple:
    """(cond, uncond) (B, 77, D) embeddings given instead of prompts, checked and cast to the text encoder's dtype;
    None where not given."""
    if prompts is not None and prompt_embeds is not None:
        raise PipelineError("pass either prompts or prompt_embeds (B, 77, D), not both")
    if prompt_embeds is None:  # prompts are checked as prompts
        if negative_prompt_embeds is not None:
            raise PipelineError("negative_prompt_embeds needs prompt_embeds; with prompts, pass negative_prompts")
        return None, None
    expected = (tokenizer.MAX_LENGTH, text_encoder.config.hidden_size)
    given = [e for e in (prompt_embeds, negative_prompt_embeds) if e is not None]
    for name, e in zip(("prompt_embeds", "negative_prompt_embeds"), given, strict=False):
        shape = np.shape(e)
        if len(shape) != 3 or shape[0] < 1 or shape[1:] != expected or not np.isfinite(np.asarray(e)).all():
            raise PipelineError(
                f"{name} must be finite (B, {', '.join(map(str, expected))}) text embeddings, got {shape}"
            )
    if len(given) == 2 and np.shape(given[1]) != np.shape(given[0]):
        raise PipelineError(
            f"negative_prompt_embeds {np.shape(given[1])} must have prompt_embeds' shape {np.shape(given[0])}"
        )
    cast = [None if e is None else jnp.asarray(e, text_encoder.dtype) for e in (prompt_embeds, negative_prompt_embeds)]
    return tuple(cast)


def _negative_prompts(negative_prompts: str | list[str] | None, n: int) -> list[str]:
    if negative_prompts is None:
        return [""] * n
    if isinstance(negative_prompts, str):
        return [negative_prompts] * n
    negative_prompts = _prompt_list("negative_prompts", negative_prompts)
    if len(negative_prompts) != n:
        raise PipelineError(f"got {len(negative_prompts)} negative prompts for {n} prompts; pass one per prompt")
    return list(negative_prompts)


def _compute_module(module: Any) -> Any:
    """The network that samples: ``module`` itself, or on the CPU a float32 copy of a 16-bit one. XLA:CPU has no
    fast 16-bit convolution (bench_unet: 6.06 s per SD 1.5 UNet evaluation in bfloat16 against 5.07 s in float32),
    so a bfloat16 pipeline keeps its params in 16 bits and the sampling program casts them to float32 once, before
    its loop (``DenoiseSpec.upcast_params``). GPUs and TPUs compute in the module's dtype."""
    if jax.default_backend() == "cpu" and jnp.dtype(module.dtype) != jnp.float32:
        return module.clone(dtype=jnp.float32)
    return module


def _repeat(items: list[str], times: int) -> list[str]:
    return [item for item in items for _ in range(times)]


def _is_latents(init: Any) -> bool:
    """Whether an img2img input is diffusion latents (a 4-d array (N, h, w, C)) rather than an image."""
    return isinstance(init, (np.ndarray, jax.Array)) and np.ndim(init) == 4


def _check_clip_skip(clip_skip: Any, text_encoder: Any) -> int:
    layers = text_encoder.config.num_hidden_layers
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, (int, np.integer)) or not 1 <= clip_skip < layers:
        raise PipelineError(
            f"clip_skip must be None or an int in [1, {layers - 1}] (text encoder layers), got {clip_skip!r}"
        )
    return int(clip_skip)


@functools.lru_cache(maxsize=32)
def _plan(
    cfg: schedule.ScheduleConfig,
    sampler: str,
    steps: int,
    strength: float,
    karras: bool | None,
    denoising_start: float | None = None,
    denoising_end: float | None = None,
):
    if sampler not in samplers.SAMPLERS:
        raise PipelineError(f"unknown sampler {sampler!r}; choose one of: {', '.join(samplers.SAMPLERS)}")
    try:
        return samplers.make_plan(
            cfg,
            sampler,
            steps,
            strength=strength,
            use_karras_sigmas=karras,
            denoising_start=denoising_start,
            denoising_end=denoising_end,
        )
    except ValueError as e:  # one error class for every bad generate() argument
        raise PipelineError(str(e)) from e


@functools.partial(jax.jit, static_argnums=(0, 3))
def _encode_text(text_encoder: Any, params: Any, input_ids: jax.Array, layer: int | None = None) -> jax.Array:
    """Token ids (B, T) -> (B, T, D): the last hidden state, or hidden state ``layer`` then the final layer norm."""
    if layer is None:
        return text_encoder.apply({"params": params}, input_ids)
    _, hidden_states = text_encoder.apply({"params": params}, input_ids, output_hidden_states=True)
    return text_encoder.apply({"params": params}, hidden_states[layer], method=text_encoder.apply_final_layer_norm)
