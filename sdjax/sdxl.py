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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdjax import loading, samplers, schedule, tokenizer
from sdjax.errors import PipelineError
from sdjax.loading import folders, textual_inversion
from sdjax.pipeline import (
    DiffusionPipeline,
    _check_clip_skip,
    _negative_prompts,
    _prompt_list,
    _repeat,
    check_generate_args,
)

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

    @property
    def default_sampler(self) -> str:
        """The sampler of the folder's scheduler class (SDXL ships EulerDiscreteScheduler: "euler")."""
        return samplers.sampler_for_class(self.scheduler_class, "euler")

    # ------------------------------------------------------------------------------------------- prompts

    def encode_prompt(
        self, prompts: list[str], prompts_2: list[str] | None = None, clip_skip: int | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """Prompts -> (encoder_hidden_states (B, 77, D1 + D2), pooled text_embeds (B, P)), as diffusers: each
        encoder's penultimate hidden state (``clip_skip`` k: the (k + 2)-th from the end), concatenated on the
        feature axis, and the second encoder's projected pooled output. ``prompts_2`` (default: ``prompts``)
        go to the second encoder."""
        texts = {"text_encoder": list(prompts), "text_encoder_2": list(prompts_2 or prompts)}
        hidden, pooled = [], None
        for name, tokenizer_name in ENCODERS:
            encoder = getattr(self, name)
            if encoder is None:
                continue
            layer = -2 if clip_skip is None else -(_check_clip_skip(clip_skip, encoder) + 2)
            tok = self.tokenizers[tokenizer_name]
            expanded = [textual_inversion.expand_prompt(tok, text) for text in texts[name]]
            ids = jnp.asarray(tokenizer.tokenize(tok, expanded))
            states, projected = hidden_and_pooled(encoder, self.params[name], ids, layer)
            hidden.append(states)
            pooled = projected if projected is not None else pooled
        return jnp.concatenate(hidden, axis=-1), pooled

    def time_ids(self, original_size: tuple, crops_coords_top_left: tuple, last: tuple) -> np.ndarray:
        """SDXL's micro-conditioning (6,) base / (5,) refiner float32: original (h, w), crop (top, left), then the
        target (h, w) (base) or the aesthetic score (refiner); checked against the UNet's ``add_embedding``."""
        ids = np.asarray([*original_size, *crops_coords_top_left, *last], np.float32)
        cfg = self.unet.config
        if cfg.addition_embed_type != "text_time":
            raise PipelineError(f"this UNet has addition_embed_type={cfg.addition_embed_type!r}; SDXL's is 'text_time'")
        pooled = self.text_encoder_2.config.projection_dim
        expected = (cfg.projection_class_embeddings_input_dim - pooled) / cfg.addition_time_embed_dim
        if len(ids) != expected:
            kind = "aesthetic score" if self.requires_aesthetics_score else "target size"
            raise PipelineError(
                f"the UNet expects {expected:g} time ids, the pipeline makes {len(ids)} (original size, crop, "
                f"{kind}): requires_aesthetics_score={self.requires_aesthetics_score} in model_index.json does not "
                "fit this UNet"
            )
        return ids

    def _added_time_ids(self, size: tuple[int, int], img2img: bool, micro: dict[str, Any]) -> tuple[Any, Any]:
        """(positive, negative) time ids as diffusers' SDXL pipelines make them (txt2img: the negative ones differ
        only when both negative sizes are given; img2img: each negative field defaults to its positive one)."""
        original = _pair("original_size", micro["original_size"] or size)
        target = _pair("target_size", micro["target_size"] or size)
        crop = _pair("crops_coords_top_left", micro["crops_coords_top_left"])
        negative_crop = _pair("negative_crops_coords_top_left", micro["negative_crops_coords_top_left"])
        negative_original = micro["negative_original_size"]
        negative_target = micro["negative_target_size"]
        if self.requires_aesthetics_score:
            scores = [_score(micro, "aesthetic_score"), _score(micro, "negative_aesthetic_score")]
            positive = self.time_ids(original, crop, (scores[0],))
            negative_original = _pair("negative_original_size", negative_original or original)
            return positive, self.time_ids(negative_original, negative_crop, (scores[1],))
        positive = self.time_ids(original, crop, target)
        if img2img:  # diffusers' img2img pairs the negative sizes with the positive crop
            negative_original = _pair("negative_original_size", negative_original or original)
            negative_target = _pair("negative_target_size", negative_target or target)
            return positive, self.time_ids(negative_original, crop, negative_target)
        if negative_original is None or negative_target is None:
            return positive, positive
        negative = (_pair("negative_original_size", negative_original), negative_crop)
        return positive, self.time_ids(*negative, _pair("negative_target_size", negative_target))

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
        n = len(prompts)
        states, pooled = self.encode_prompt(prompts, prompts_2, clip_skip)
        out = {"cond": {"encoder_hidden_states": states, "text_embeds": pooled, "time_ids": _rows(time_ids[0], n)}}
        if guided:
            if negative_prompts is None and self.force_zeros_for_empty_prompt:
                neg_states, neg_pooled = jnp.zeros_like(states), jnp.zeros_like(pooled)
            else:
                negative = negative_prompts or [""] * n
                neg_states, neg_pooled = self.encode_prompt(negative, negative_prompts_2 or negative, clip_skip)
            out["uncond"] = {
                "encoder_hidden_states": neg_states,
                "text_embeds": neg_pooled,
                "time_ids": _rows(time_ids[1], n),
            }
        return out

    # ------------------------------------------------------------------------------------------- generation

    def generate(
        self,
        prompts: str | list[str],
        negative_prompts: str | list[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
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
        strength: float = 0.3,
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
        progress: bool = False,
    ) -> np.ndarray:
        """Text-to-image, image-to-image (``init_image``: an image, or latents) and the base -> refiner hand-off.

        Arguments as :meth:`sdjax.StableDiffusion.generate`, with SDXL's defaults (guidance 5.0; the sampler of
        the folder's scheduler class, "euler" for the published models; img2img strength 0.3), plus:
          prompts_2, negative_prompts_2: prompts for the second text encoder (default: the first ones).
          original_size, crops_coords_top_left, target_size (and negative_*): micro-conditioning, (h, w) /
            (top, left) pixels; sizes default to (height, width).
          aesthetic_score, negative_aesthetic_score: the refiner's (``requires_aesthetics_score``) conditioning.
          denoising_end: in (0, 1), stop after that fraction of the schedule (with ``output="latent"``, the
            base's half of the hand-off); denoising_start: start there, from ``init_image`` latents as given
            (the refiner's half; ``strength`` is then unused).
          output: "image" (N, H, W, 3) in [0, 1], or "latent": the diffusion latents (N, H/8, W/8, 4).
        """
        prompts = _prompt_list("prompts", prompts)
        n = len(prompts)
        check_generate_args(guidance_scale, eta, strength, seed, num_images_per_prompt)
        prompts_2 = None if prompts_2 is None else _matched("prompts_2", prompts_2, n)
        negatives = None if negative_prompts is None else _negative_prompts(negative_prompts, n)
        negatives_2 = None if negative_prompts_2 is None else _negative_prompts(negative_prompts_2, n)
        if self.requires_aesthetics_score and init_image is None:
            raise PipelineError(
                "this SDXL model (requires_aesthetics_score: a refiner) works on an image: pass init_image (an image, "
                'or the latents of generate(..., denoising_end=..., output="latent") with denoising_start)'
            )
        text_lists = (prompts, prompts_2, negatives, negatives_2)
        micro = {
            "original_size": original_size,
            "crops_coords_top_left": crops_coords_top_left,
            "target_size": target_size,
            "negative_original_size": negative_original_size,
            "negative_crops_coords_top_left": negative_crops_coords_top_left,
            "negative_target_size": negative_target_size,
            "aesthetic_score": aesthetic_score,
            "negative_aesthetic_score": negative_aesthetic_score,
        }

        def conditions(guided: bool, height: int, width: int) -> dict[str, Any]:  # after the batch-size checks
            texts = [None if p is None else _repeat(p, num_images_per_prompt) for p in text_lists]
            ids = self._added_time_ids((height, width), init_image is not None, micro)
            return self.conditions(*texts, guided, ids, clip_skip)

        return self._sample(
            conditions,
            n * num_images_per_prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            sampler=self.default_sampler if sampler is None else sampler,
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
            denoising_start=denoising_start,
            denoising_end=denoising_end,
            output=output,
        )


def _matched(name: str, prompts: str | list[str], n: int) -> list[str]:
    """A second-encoder prompt list: one string for all, or exactly one per prompt."""
    if isinstance(prompts, str):
        return [prompts] * n
    prompts = _prompt_list(name, prompts)
    if len(prompts) != n:
        raise PipelineError(f"got {len(prompts)} {name} for {n} prompts; pass one per prompt (or one string)")
    return prompts


def _pair(name: str, value: Any) -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2 or not all(_is_number(v) for v in value):
        raise PipelineError(f"{name} must be a pair of numbers (pixels), got {value!r}")
    return float(value[0]), float(value[1])


def _score(micro: dict[str, Any], name: str) -> float:
    if not _is_number(micro[name]):
        raise PipelineError(f"{name} must be a finite number, got {micro[name]!r}")
    return float(micro[name])


def _is_number(value: Any) -> bool:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    return ok and bool(np.isfinite(value))


def _rows(time_ids: np.ndarray, n: int) -> jax.Array:
    return jnp.broadcast_to(jnp.asarray(time_ids), (n, time_ids.shape[0]))


@functools.partial(jax.jit, static_argnums=(0, 3))
def hidden_and_pooled(encoder: Any, params: Any, ids: jax.Array, layer: int) -> tuple[jax.Array, Any]:
    """Token ids (B, 77) -> (hidden state ``layer`` (B, 77, D), projected pooled output (B, P) or None for an
    encoder without projection)."""
    out = encoder.apply({"params": params}, ids, output_hidden_states=True)
    if len(out) == 3:  # CLIPTextModelWithProjection: (text_embeds, last_hidden_state, hidden_states)
        return out[2][layer], out[0]
    return out[1][layer], None
