"""``StableDiffusionXL``: the SDXL family (Podell et al. 2023, "SDXL: Improving Latent Diffusion Models for
High-Resolution Image Synthesis") over the same denoise function as Stable Diffusion 1.x / 2.x.

What differs from SD is only the UNet's conditioning (:meth:`StableDiffusionXL.conditions`): the prompt goes
through two text encoders (CLIP ViT-L and OpenCLIP ViT-bigG; the refiner has only the second), whose penultimate
hidden states are concatenated into ``encoder_hidden_states`` (B, 77, 2048), and the second encoder's pooled,
projected embedding (B, 1280) joins "micro-conditioning" ``time_ids``: original size, crop corner and target
size (base), or original size, crop corner and an aesthetic score (refiner). Both are traced inputs of the one
compiled program: changing them recompiles nothing.

Base -> refiner ("ensemble of expert denoisers", as diffusers)::

    latents = base.generate(prompt, num_inference_steps=40, denoising_end=0.8, output="latent")
    images = refiner.generate(prompt, num_inference_steps=40, denoising_start=0.8, init_image=latents)
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from sdjax import conditioning, generation, loading, samplers, schedule, tokenizer
from sdjax.arguments import check_clip_skip, check_generate_args, negative_prompt_list, prompt_list, repeat
from sdjax.errors import PipelineError
from sdjax.loading import folders, textual_inversion
from sdjax.pipeline import DiffusionPipeline

# generate()'s micro-conditioning arguments (sdjax.conditioning.added_time_ids).
MICRO_CONDITIONING = ("original_size", "crops_coords_top_left", "target_size", "negative_original_size",
                      "negative_crops_coords_top_left", "negative_target_size", "aesthetic_score",
                      "negative_aesthetic_score")  # fmt: skip
# The text encoders in prompt order, with their tokenizer folders.
ENCODERS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))


@dataclass
class StableDiffusionXL(DiffusionPipeline):
    """Stable Diffusion XL, base or refiner: UNet, VAE, one or two text encoders and tokenizers, noise schedule.

    Attributes:
      unet, vae, text_encoder (None for the refiner), text_encoder_2: flax.linen modules.
      params: {"unet", "vae", "text_encoder" (base only), "text_encoder_2"} parameter trees.
      tokenizers: {"tokenizer" (base only), "tokenizer_2"}: transformers ``CLIPTokenizer`` s.
      schedule, scheduler_class: the scheduler config and its diffusers class (SDXL: EulerDiscreteScheduler).
      force_zeros_for_empty_prompt: without negative prompts, the unconditional branch gets zero embeddings
        (model_index.json; True for the base). requires_aesthetics_score: the refiner's time ids end with an
        aesthetic score instead of the target size (model_index.json).
    """

    unet: Any
    vae: Any
    text_encoder: Any
    text_encoder_2: Any
    params: dict[str, Any]
    tokenizers: dict[str, Any]
    schedule: schedule.ScheduleConfig
    scheduler_class: str = "EulerDiscreteScheduler"
    force_zeros_for_empty_prompt: bool = True
    requires_aesthetics_score: bool = False
    _replicated: dict[str, Any] = field(default_factory=dict, repr=False)
    _compiled: dict[Any, Any] = field(default_factory=dict, repr=False)
    last_timings: dict[str, float] = field(default_factory=dict, repr=False)
    _lora: Any = field(default=None, repr=False)
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    family: ClassVar[str] = "sdxl"
    family_guidance_scale: ClassVar[float] = 5.0

    # ------------------------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, dtype: Any = jnp.float32, variant: str | None = None, *, config: Any = None
    ):
        """Loads SDXL from a diffusers folder of ``StableDiffusionXLPipeline`` (base: two text encoders and
        tokenizers) or ``StableDiffusionXLImg2ImgPipeline`` (refiner: ``text_encoder_2`` only), an sdjax
        workdir holding one, or a single-file ``.safetensors`` checkpoint (sd_xl_base_1.0 / sd_xl_refiner_1.0
        layout: published configs, scheduler and built-in tokenizers; ``config``: a diffusers SDXL folder to take
        configs and tokenizers from instead, as diffusers' ``from_single_file``). ``dtype``: float32, bfloat16 or
        float16 params and compute; a VAE whose config sets ``force_upcast`` (SDXL's) stays float32, as diffusers
        decodes. ``variant`` picks ``*.{variant}.safetensors`` files (e.g. "fp16")."""
        c = loading.load(path, dtype, variant, family="sdxl", config=config)
        return cls(
            unet=c.modules["unet"],
            vae=c.modules["vae"],
            text_encoder=c.modules.get("text_encoder"),
            text_encoder_2=c.modules["text_encoder_2"],
            params=c.params,
            tokenizers=c.tokenizers,
            schedule=c.schedule,
            scheduler_class=c.scheduler_class,
            generation_defaults=c.generation,
            **c.options,
        )

    def save_pretrained(self, path: str | os.PathLike, dtype: str = "float32") -> None:
        """Writes a diffusers folder that diffusers' ``StableDiffusionXLPipeline`` (base) or
        ``StableDiffusionXLImg2ImgPipeline`` (refiner) ``from_pretrained`` loads; ``dtype`` "float32" or
        "float16"."""
        options = {
            "force_zeros_for_empty_prompt": self.force_zeros_for_empty_prompt,
            "requires_aesthetics_score": self.requires_aesthetics_score,
        }
        layout = folders.SDXL
        if self.text_encoder is None:  # the refiner is written as diffusers writes it: an img2img pipeline
            layout = dataclasses.replace(layout, pipeline_classes=layout.pipeline_classes[1:])
        self._write_folder(path, dtype, layout, self.tokenizers, options)

    @property
    def modules(self) -> dict[str, Any]:
        names = ("unet", "vae", "text_encoder", "text_encoder_2")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    @property
    def text_encoder_slots(self) -> list[tuple[str, str, str | None]]:
        parts = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
        return [(name, tok, parts[name]) for name, tok in ENCODERS if getattr(self, name) is not None]

    def _tokenizer(self, name: str) -> Any:
        return self.tokenizers[name]

    def _set_tokenizer(self, name: str, tok: Any) -> None:
        self.tokenizers = {**self.tokenizers, name: tok}

    def family_sampler(self) -> str:
        """The sampler of the folder's scheduler class (SDXL ships EulerDiscreteScheduler: "euler")."""
        return samplers.sampler_for_class(self.scheduler_class, "euler", self.schedule)

    # ------------------------------------------------------------------------------------------- prompts

    def encode_prompt(
        self, prompts: list[str], prompts_2: list[str] | None = None, clip_skip: int | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """Prompts -> (encoder_hidden_states (B, 77, D1 + D2), pooled text_embeds (B, P)), as diffusers: each
        encoder's penultimate hidden state (``clip_skip`` k: the (k + 2)-th from the end), concatenated on the
        feature axis, and the second encoder's projected pooled output. ``prompts_2`` (default: ``prompts``)
        go to the second encoder."""
        texts = {"text_encoder": list(prompts), "text_encoder_2": list(prompts_2 or prompts)}
        encoders = []
        for name, tokenizer_name in ENCODERS:
            encoder = getattr(self, name)
            if encoder is None:
                continue
            layer = -2 if clip_skip is None else -(check_clip_skip(clip_skip, encoder) + 2)
            tok = self.tokenizers[tokenizer_name]
            expanded = [textual_inversion.expand_prompt(tok, text) for text in texts[name]]
            encoders.append((encoder, self.params[name], jnp.asarray(tokenizer.tokenize(tok, expanded)), layer))
        return conditioning.sdxl_text(encoders)

    def time_ids(self, original_size: tuple, crops_coords_top_left: tuple, last: tuple) -> np.ndarray:
        """SDXL's micro-conditioning (6,) base / (5,) refiner float32 (see :func:`sdjax.conditioning.sdxl_time_ids`)."""
        ids = (original_size, crops_coords_top_left, last)
        pooled = self.text_encoder_2.config.projection_dim
        return conditioning.sdxl_time_ids(*ids, self.unet.config, pooled, self.requires_aesthetics_score)

    def conditions(
        self,
        prompts: list[str],
        prompts_2: list[str] | None,
        negative_prompts: list[str] | None,
        negative_prompts_2: list[str] | None,
        guided: bool,
        time_ids: tuple[np.ndarray, np.ndarray],
        clip_skip: int | None = None,
    ) -> dict[str, Any]:
        """The UNet's inputs {"cond": {...}, "uncond": {...}} (``encoder_hidden_states``, ``text_embeds``,
        ``time_ids``) for B prompts. With no negative prompts and ``force_zeros_for_empty_prompt`` the negative
        embeddings are zeros, as diffusers."""
        encode = functools.partial(self.encode_prompt, clip_skip=clip_skip)
        texts = (prompts, prompts_2, negative_prompts, negative_prompts_2)
        return conditioning.sdxl_conditions(encode, texts, guided, time_ids, self.force_zeros_for_empty_prompt)

    # ------------------------------------------------------------------------------------------- generation

    def generate(
        self,
        prompts: str | list[str],
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
        prompts_2: str | list[str] | None = None,
        negative_prompts_2: str | list[str] | None = None,
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
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        output: str = "image",
        scheduler_config: dict[str, Any] | None = None,
        progress: bool = False,
    ) -> np.ndarray:
        """Text-to-image, image-to-image (``init_image``: an image, or latents), inpainting (``mask_image``),
        ControlNet guidance (``controlnet``, ``control_image``) and the base -> refiner hand-off.

        Arguments as :meth:`sdjax.StableDiffusion.generate`, with SDXL's defaults (unless the folder's
        generation_config.json says otherwise: guidance 5.0 and the sampler of the folder's scheduler class, "euler"
        for the published models; strength 0.3 for img2img, 0.9999 for
        inpainting, as diffusers' SDXL pipelines), plus:
          prompts_2, negative_prompts_2: prompts for the second text encoder (default: the first ones).
          original_size, crops_coords_top_left, target_size (and negative_*): micro-conditioning, (h, w) /
            (top, left) pixels; sizes default to (height, width).
          aesthetic_score, negative_aesthetic_score: the refiner's (``requires_aesthetics_score``) conditioning.
          denoising_end: in (0, 1), stop after that fraction of the schedule (with ``output="latent"``, the
            base's half of the hand-off); denoising_start: start there, from ``init_image`` latents as given
            (the refiner's half; ``strength`` is then unused).
          scheduler_config: e.g. SDXL-Lightning's ``{"timestep_spacing": "trailing"}`` with ``sampler="euler"``.
        """
        strength = (0.9999 if mask_image is not None else 0.3) if strength is None else strength
        sampler, guidance_scale = self.sampling_settings(sampler, guidance_scale)
        check_generate_args(guidance_scale, eta, strength, seed, num_images_per_prompt)
        texts = _prompt_lists(self, prompts, prompts_2, negative_prompts, negative_prompts_2, init_image)
        micro = {name: value for name, value in locals().items() if name in MICRO_CONDITIONING}

        def conditions(guided: bool, height: int, width: int, img2img: bool) -> dict[str, Any]:
            repeated = [None if p is None else repeat(p, num_images_per_prompt) for p in texts]
            aesthetic = self.requires_aesthetics_score
            ids = conditioning.added_time_ids(self.time_ids, (height, width), img2img, micro, aesthetic)
            return self.conditions(*repeated, guided, ids, clip_skip)

        request = generation.Request(
            num_inference_steps, guidance_scale, sampler, seed, height, width, latents, eta, init_image, strength,
            mask_image, controlnet, control_image, controlnet_conditioning_scale, control_guidance_start,
            control_guidance_end, guess_mode, use_karras_sigmas, guidance_rescale, denoising_start, denoising_end,
            output, scheduler_config, progress,
        )  # fmt: skip
        return generation.generate(self, conditions, len(texts[0]) * num_images_per_prompt, request)


def _prompt_lists(pipe: Any, prompts: Any, prompts_2: Any, negatives: Any, negatives_2: Any, init_image: Any) -> tuple:
    """(prompts, prompts_2, negative_prompts, negative_prompts_2) as lists of n (None where not given), checked."""
    prompts = prompt_list("prompts", prompts)
    n = len(prompts)
    pipe._check_negative_prompts(negatives, negatives_2)
    if pipe.requires_aesthetics_score and init_image is None:
        raise PipelineError(
            "this SDXL model (requires_aesthetics_score: a refiner) works on an image: pass init_image (an image, "
            'or the latents of generate(..., denoising_end=..., output="latent") with denoising_start)'
        )
    return (
        prompts,
        None if prompts_2 is None else _matched("prompts_2", prompts_2, n),
        None if negatives is None else negative_prompt_list(negatives, n),
        None if negatives_2 is None else negative_prompt_list(negatives_2, n),
    )


def _matched(name: str, prompts: str | list[str], n: int) -> list[str]:
    """A second-encoder prompt list: one string for all, or exactly one per prompt."""
    if isinstance(prompts, str):
        return [prompts] * n
    prompts = prompt_list(name, prompts)
    if len(prompts) != n:
        raise PipelineError(f"got {len(prompts)} {name} for {n} prompts; pass one per prompt (or one string)")
    return prompts
