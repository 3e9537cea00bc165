"""``StableDiffusion`` (1.x / 2.x): the public pipeline class over the loaders, the text encoder and the shared
generation core (:mod:`sdjax.generation`: one compiled denoise function for every family and task).

Prompt, negative prompt, seed, guidance scale, eta, init image, mask and control images are traced values:
changing them reuses the compiled function.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from sdjax import conditioning, generation, loading, schedule, tokenizer
from sdjax.addons import AddOns
from sdjax.arguments import (
    MAX_IMAGE_SIDE,
    MAX_SEED,
    check_clip_skip,
    check_generate_args,
    check_text,
    negative_prompt_list,
    prompt_embeds_pair,
    prompt_list,
    repeat,
)
from sdjax.errors import PipelineError
from sdjax.images import read_image
from sdjax.loading import folders, generation_config, lora, textual_inversion

__all__ = [
    "MAX_IMAGE_SIDE",
    "MAX_SEED",
    "PipelineError",
    "StableDiffusion",
    "check_generate_args",
    "check_text",
    "read_image",
]

# Weight dtypes save_pretrained writes (safetensors' numpy API has no bfloat16).
_SAVE_DTYPES = {"float32": np.float32, "float16": np.float16}


class DiffusionPipeline(AddOns):
    """What every family's pipeline shares: add-ons (:class:`sdjax.addons.AddOns`), the generation core
    (:func:`sdjax.generation.generate`) and folder writing. A family class (:class:`StableDiffusion`,
    :class:`sdjax.sdxl.StableDiffusionXL`) adds its networks, its prompt encoding (the UNet's conditioning
    inputs) and its ``generate`` signature."""

    family: ClassVar[str]  # "sd" or "sdxl": what loading (sdjax.loading.family_of) and sample.py dispatch on
    family_guidance_scale: ClassVar[float]  # the default where the folder recommends none
    generation_defaults: dict[str, Any]  # the folder's generation_config.json (sdjax.loading.generation_config)
    unet: Any
    vae: Any
    schedule: schedule.ScheduleConfig
    scheduler_class: str
    _replicated: dict[str, Any]
    _compiled: dict[Any, Any]
    last_timings: dict[str, float]

    @property
    def default_guidance_scale(self) -> float:
        """The guidance scale ``generate`` uses when given none: the folder's generation_config.json, else the
        family's (SD 7.5, SDXL 5.0)."""
        return self.generation_defaults.get("guidance_scale", self.family_guidance_scale)

    @property
    def default_sampler(self) -> str:
        """The sampler ``generate`` uses when given none: the folder's generation_config.json, else the family's."""
        return self.generation_defaults.get("sampler") or self.family_sampler()

    def family_sampler(self) -> str:
        """The family's default sampler (SD: "ddim")."""
        return "ddim"

    def sampling_settings(self, sampler: str | None = None, guidance_scale: float | None = None) -> tuple[str, float]:
        """(sampler, guidance_scale): those given, else :attr:`default_sampler` / :attr:`default_guidance_scale`."""
        return (
            self.default_sampler if sampler is None else sampler,
            self.default_guidance_scale if guidance_scale is None else guidance_scale,
        )

    @property
    def embeds_guidance(self) -> int | None:
        """The UNet's ``time_cond_proj_dim`` (an LCM-distilled UNet: the guidance scale is embedded and added to
        its timestep embedding, as diffusers' ``LatentConsistencyModelPipeline``; no unconditional branch runs),
        or None."""
        return self.unet.config.time_cond_proj_dim

    def _check_negative_prompts(self, *negative_prompts: Any) -> None:
        if self.embeds_guidance and any(p is not None for p in negative_prompts):
            raise PipelineError(
                "this UNet embeds the guidance scale (time_cond_proj_dim, an LCM-distilled model) and runs no "
                "unconditional branch: negative prompts have no effect; leave them out"
            )

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel (8 for SD), the VAE's ``downsampling_factor``."""
        return self.vae.config.downsampling_factor

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
        generation_config.write(path, self.generation_defaults)


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
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    family: ClassVar[str] = "sd"
    family_guidance_scale: ClassVar[float] = 7.5

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
                   scheduler_class=c.scheduler_class, generation_defaults=c.generation)  # fmt: skip

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
        layer = None if clip_skip is None else -(check_clip_skip(clip_skip, self.text_encoder) + 1)
        return conditioning.sd_text(self.text_encoder, self.params["text_encoder"], jnp.asarray(ids), layer)

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
        cond = self.encode_prompt(prompts, clip_skip) if cond is None else cond
        conditions = {"cond": {"encoder_hidden_states": cond}}
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
        guidance_scale: float | None = None,
        sampler: str | None = None,
        seed: int = 0,
        height: int | None = None,
        width: int | None = None,
        latents: np.ndarray | jax.Array | None = None,
        eta: float = 0.0,
        *,
        num_images_per_prompt: int = 1,
        init_image: Any = None,
        strength: float | None = None,
        mask_image: Any = None,
        controlnet: Any = None,
        control_image: Any = None,
        controlnet_conditioning_scale: float | list[float] = 1.0,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        guess_mode: bool = False,
        use_karras_sigmas: bool | None = None,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        output: str = "image",
        scheduler_config: dict[str, Any] | None = None,
        progress: bool = False,
        prompt_embeds: np.ndarray | jax.Array | None = None,
        negative_prompt_embeds: np.ndarray | jax.Array | None = None,
    ) -> np.ndarray:
        """Text-to-image, image-to-image (``init_image``), inpainting (``init_image`` and ``mask_image``) and
        ControlNet guidance (``controlnet`` and ``control_image``); the tasks combine. ``prompts``: one prompt or a
        list, each giving ``num_images_per_prompt`` images; ``negative_prompts``: one per prompt (or one for all),
        "" when None; ``clip_skip``: use the text encoder's k-th layer from the end (k >= 1), as diffusers;
        ``prompt_embeds``: instead of ``prompts``, their text embeddings (B, 77, D) float (as :meth:`encode_prompt`
        returns, or interpolated between two: :func:`sdjax.interpolation.slerp`), and ``negative_prompt_embeds``
        the same shape (when None, ``negative_prompts`` are encoded, as diffusers); the other arguments as
        :class:`sdjax.generation.Request`; ``guidance_scale`` and ``sampler`` default to
        :attr:`default_guidance_scale` and :attr:`default_sampler` (7.5 and "ddim" unless the folder's
        generation_config.json recommends others). Returns np.float32 (N, H, W, 3) in [0, 1], N = len(prompts) (or
        len(prompt_embeds)) * num_images_per_prompt (``output="latent"``: the latents (N, H/8, W/8, C)).
        """
        expected = (tokenizer.MAX_LENGTH, self.text_encoder.config.hidden_size)
        embeds = prompt_embeds_pair(prompts, prompt_embeds, negative_prompt_embeds, expected, self.text_encoder.dtype)
        prompts = prompt_list("prompts", prompts) if embeds[0] is None else [""] * len(embeds[0])
        strength = (1.0 if mask_image is not None else 0.75) if strength is None else strength
        sampler, guidance_scale = self.sampling_settings(sampler, guidance_scale)
        check_generate_args(guidance_scale, eta, strength, seed, num_images_per_prompt)
        self._check_negative_prompts(negative_prompts)
        negative_prompts = negative_prompt_list(negative_prompts, len(prompts))

        def conditions(guided: bool, height: int, width: int, img2img: bool) -> dict[str, Any]:
            texts = (repeat(p, num_images_per_prompt) for p in (prompts, negative_prompts))
            repeated = tuple(None if e is None else jnp.repeat(e, num_images_per_prompt, axis=0) for e in embeds)
            return self._conditions(*texts, guided, clip_skip, repeated)

        request = generation.Request(
            num_inference_steps, guidance_scale, sampler, seed, height, width, latents, eta, init_image, strength,
            mask_image, controlnet, control_image, controlnet_conditioning_scale, control_guidance_start,
            control_guidance_end, guess_mode, use_karras_sigmas, guidance_rescale, output=output,
            scheduler_config=scheduler_config, progress=progress,
        )  # fmt: skip
        return generation.generate(self, conditions, len(prompts) * num_images_per_prompt, request)
