"""Stage 2: latent diffusion. Trains the UNet (and optionally the text encoder) to denoise the latents of a
frozen VAE; the preview samples ``config.sample_prompts`` with the pipeline. SD 1.x / 2.x, or SDXL when
config.pretrained_path is an SDXL base folder: the family (:mod:`sdjax.train.families`) supplies the UNet's
conditioning, the batch features it needs and the preview's pipeline; noise, timesteps, loss and the rest are
this module's, shared.

The model folder of a new run gets the tokenizer (a pretrained one, or one learnt from a synthetic source's
captions), the frozen VAE with the ``scaling_factor`` it is used with (measured for a new stage-1 VAE), the
configs of the networks and the scheduler config.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from sdjax import checkpoint, images, latents, schedule, tokenizer, weights
from sdjax.loading import folders, generation_config
from sdjax.train import families, losses
from sdjax.train.checks import TrainConfigError
from sdjax.train.stage import Batches, Params, Preview, close_batches
from sdjax.train.steps import LossFn, example_keys, normal


class DiffusionStage:
    name = "diffusion"
    reads_captions = True

    def trained(self, config: ml_collections.ConfigDict) -> tuple[str, ...]:
        return ("unet", "text_encoder") if config.train_text_encoder else ("unet",)

    def write_model_folder(self, config: ml_collections.ConfigDict, folder: Path, batches_fn: Any) -> None:
        layout = _layout(config)
        with tempfile.TemporaryDirectory() as scratch:
            tokenizers = _new_tokenizers(config, layout, Path(scratch))
            vae, vae_params = _scaled_vae(config, lambda: batches_fn(tokenizers["tokenizer"]))
            networks = _new_networks(config, layout, tokenizers["tokenizer"])
            components = {
                "vae": (vae, vae_params),
                "unet": (networks["unet"], None),
                **{name: (networks[name], params) for name, params in _text_encoder_params(config, layout).items()},
            }
            folders.write_model_folder(
                folder, components, tokenizers=tokenizers, scheduler_config=_scheduler_config(config), layout=layout,
                options=_model_options(config, layout),
            )  # fmt: skip
        generation_config.write(folder, _generation_settings(config))

    def training_inputs(self, config: ml_collections.ConfigDict, model: Any) -> Callable[..., dict[str, jax.Array]]:
        """``inputs(params, frozen, batch, rng, step)`` -> the arrays of one denoising step, per device: the
        latents ``x0`` of the frozen VAE (``frozen["vae"]``), ``noise``, timesteps ``t`` (uniform), ``noisy``
        latents, the ``target`` (the schedule's ``prediction_type``: epsilon / v / sample), min-SNR-gamma
        ``weights`` (config.loss.snr_gamma) and the UNet's ``conditions`` (the family's,
        :mod:`sdjax.train.families`). Offset noise (config.loss.noise_offset) as an option."""
        conditions = families.get_family(model.family).conditions
        vae = model.modules["vae"]
        # The noise schedule of training, as diffusers' training scripts read it (DDPMScheduler.from_pretrained).
        schedule_cfg = model.schedule.for_class("DDPMScheduler")
        alphas_cumprod = schedule.alphas_cumprod(schedule_cfg)
        prediction_type, loss_cfg = schedule_cfg.prediction_type, config.loss

        def inputs(params, frozen, batch, rng, step):
            images = batch["image"]
            posterior_key, noise_key, offset_key, t_key = example_keys(rng, step, images.shape[0], 4)
            shape = latents.latent_shape(vae, images.shape[1], images.shape[2])
            x0 = jax.lax.stop_gradient(latents.encode(vae, frozen["vae"], images, normal(posterior_key, shape)))
            noise = normal(noise_key, shape)
            if loss_cfg.noise_offset:
                noise = losses.offset_noise(noise, normal(offset_key, shape[-1:]), loss_cfg.noise_offset)
            t = jax.vmap(lambda k: jax.random.randint(k, (), 0, schedule_cfg.num_train_timesteps))(t_key)
            return {
                "x0": x0,
                "noise": noise,
                "t": t,
                "noisy": schedule.add_noise(alphas_cumprod, x0, noise, t),
                "target": losses.diffusion_target(alphas_cumprod, x0, noise, t, prediction_type),
                "weights": losses.min_snr_weights(schedule.snr(alphas_cumprod, t), loss_cfg.snr_gamma, prediction_type),
                "conditions": conditions(model, params, frozen, batch),
            }

        return inputs

    def loss_fn(self, config: ml_collections.ConfigDict, model: Any) -> LossFn:
        """Denoising loss of the UNet on :meth:`training_inputs` (the text encoder trained when its params are in
        ``params``, else frozen). Metrics: loss, mse."""
        unet, inputs_fn = model.modules["unet"], self.training_inputs(config, model)

        def loss_fn(params, frozen, batch, rng, step):
            x = inputs_fn(params, frozen, batch, rng, step)
            noisy = x["noisy"].astype(unet.dtype)
            prediction = unet.apply({"params": params["unet"]}, noisy, x["t"], **x["conditions"])
            return losses.diffusion_loss(prediction, x["target"], x["weights"])

        return loss_fn

    def preview(self, config: ml_collections.ConfigDict, model: Any, images_: np.ndarray) -> Preview:
        """Samples of config.sample_prompts (config.sample_steps, config.sample_guidance_scale, seed 0) with the
        family's pipeline. One pipeline for the run, so the sampler compiles once."""
        pipe = families.get_family(model.family).pipeline(model)

        def draw(params):
            pipe.params = {**model.frozen, **params}
            pictures = pipe.generate(
                list(config.sample_prompts), num_inference_steps=config.sample_steps,
                guidance_scale=config.sample_guidance_scale, seed=0,
            )  # fmt: skip
            return images.image_grid(pictures)

        return draw


@functools.partial(jax.jit, static_argnums=0)
def _vae_mean(vae: Any, params: Any, images: jax.Array) -> jax.Array:
    return vae.apply({"params": params}, images, method=vae.encode).mean


def latent_std(vae: Any, params: Any, batches: list[jax.Array]) -> float:
    """Standard deviation of the (unscaled, posterior-mean) latents of ``batches`` of images (B, H, W, 3) in
    [-1, 1]: 1 / latent_std is the ``scaling_factor`` that gives the diffusion model unit-variance latents
    (Rombach et al. 2022, Sec. G)."""
    z = jnp.concatenate([_vae_mean(vae, params, jnp.asarray(x)).reshape(-1) for x in batches])
    return float(jnp.std(z.astype(jnp.float32)))


def _layout(config: ml_collections.ConfigDict) -> folders.Layout:
    """The family layout of the run: config.pretrained_path's (SD or SDXL base), else SD (built from config)."""
    if not config.pretrained_path:
        return folders.SD
    root = Path(config.pretrained_path)
    index = folders.read_model_index(root)
    layout = folders.layout_of(index, root)
    if layout.family == "sdxl" and (index.get("requires_aesthetics_score") or "text_encoder" not in
                                    folders.present_networks(index, layout)):  # fmt: skip
        raise TrainConfigError(f"{root} is an SDXL refiner; sdjax fine-tunes SDXL base models (two text encoders)")
    if layout.family == "sdxl" and config.train_text_encoder:
        raise TrainConfigError("train_text_encoder=True is for SD 1.x/2.x; SDXL fine-tuning trains the UNet only")
    return layout


def _model_options(config: ml_collections.ConfigDict, layout: folders.Layout) -> dict[str, Any]:
    """The model_index options of the family (SDXL's force_zeros_for_empty_prompt...), from the pretrained folder."""
    if not config.pretrained_path:
        return {}
    index = folders.read_model_index(Path(config.pretrained_path))
    return {key: index.get(key, default) for key, default in layout.options.items()}


def _new_tokenizers(config: ml_collections.ConfigDict, layout: folders.Layout, scratch: Path) -> dict[str, Any]:
    """Folder name -> tokenizer: the pretrained model's (each of its family's), else config.tokenizer_path's,
    else one learnt from a synthetic source's captions."""
    if config.pretrained_path:
        return {name: tokenizer.load_tokenizer(Path(config.pretrained_path) / name) for name in layout.tokenizers}
    if config.tokenizer_path:
        return {"tokenizer": tokenizer.load_tokenizer(config.tokenizer_path)}
    from sdjax.data import sources

    captions = sources.captions(config.data.source)
    if captions is not None:  # a synthetic source with a finite set of captions: its own small vocabulary
        return {"tokenizer": tokenizer.build_tokenizer(captions, scratch)}
    raise TrainConfigError(
        f"no tokenizer for data source {config.data.source!r}: set config.tokenizer_path (a CLIP tokenizer folder) "
        "or config.pretrained_path (a diffusers Stable Diffusion folder)"
    )


def _vae_hint(config: ml_collections.ConfigDict) -> str:
    also = "set --config.vae_path to a stage-1 workdir or a diffusers VAE folder"
    if not config.get("vae_config"):
        return also
    return f"train it first with `python train.py --config={config.vae_config} --workdir={config.vae_path}`, or {also}"


def _load_vae(config: ml_collections.ConfigDict) -> tuple[Any, Params, bool]:
    """(module, float32 params, new) of the stage-2 VAE; ``new`` when it comes from a stage-1 workdir."""
    if not config.vae_path and not config.pretrained_path:
        raise TrainConfigError(
            "stage 2 needs a VAE: set --config.pretrained_path (a diffusers Stable Diffusion folder) or "
            "--config.vae_path (a stage-1 workdir or a diffusers AutoencoderKL folder)"
        )
    path = Path(config.vae_path or Path(config.pretrained_path) / "vae")
    if checkpoint.is_workdir(path):
        try:
            params = checkpoint.load_trained_params(path, ema=config.vae_ema)
        except checkpoint.CheckpointError as e:
            raise TrainConfigError(f"stage-1 workdir {path} has no VAE checkpoint ({e}); {_vae_hint(config)}") from e
        if "vae" not in params:
            raise TrainConfigError(f"{path} is not a stage-1 (VAE) workdir: it trained {sorted(params)}")
        return weights.build_component(path / checkpoint.MODEL_DIR / "vae"), params["vae"], True
    for folder in (path, path / "vae"):
        if (folder / "config.json").is_file():
            module, params = weights.load_component(folder)
            return module, params, False
    raise TrainConfigError(f"no VAE at {path}; {_vae_hint(config)}")


def _scaled_vae(config: ml_collections.ConfigDict, batches_fn: Callable[[], Batches]) -> tuple[Any, Params]:
    """The frozen VAE with the ``scaling_factor`` it will be used with: config.scaling_factor if set, else
    1 / std of the latents of config.scaling_batches batches (from ``batches_fn()``) for a new VAE, else the
    VAE's own."""
    module, params, new = _load_vae(config)
    factor = config.scaling_factor
    if factor is None and new:
        batches = batches_fn()
        try:
            first = itertools.islice(batches, config.scaling_batches)
            images = [b["image"].reshape(-1, *b["image"].shape[2:]) for b in first]
        finally:
            close_batches(batches)
        factor = 1.0 / latent_std(module, params, images)
        logging.info("VAE latent scaling_factor = 1 / std = %.5f", factor)
    if factor is not None:
        module = module.clone(config=dataclasses.replace(module.config, scaling_factor=float(factor)))
    return module, params


def _generation_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The model's recommended sampler and guidance (generation_config.json): config.generation, else those of
    config.pretrained_path's folder."""
    if config.get("generation"):
        return generation_config.check(config.generation.to_dict(), "config.generation")
    return generation_config.read(config.pretrained_path) if config.pretrained_path else {}


def _scheduler_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    if config.pretrained_path:
        path = Path(config.pretrained_path) / "scheduler" / "scheduler_config.json"
        return json.loads(path.read_text())
    cfg = schedule.ScheduleConfig(**config.schedule.to_dict())  # sdjax's own config: every field explicit
    return {"_class_name": config.scheduler_class, "_diffusers_version": weights.DIFFUSERS_VERSION, **cfg.to_dict()}


def _new_networks(config: ml_collections.ConfigDict, layout: folders.Layout, tok: Any) -> dict[str, Any]:
    """Modules of the text encoder(s) and UNet: from config.pretrained_path, else built from config."""
    if config.pretrained_path:
        root = Path(config.pretrained_path)
        return {name: weights.build_component(root / name) for name in layout.networks if name != "vae"}
    from sdjax.models.clip import CLIPTextConfig, CLIPTextModel
    from sdjax.models.unet import UNet2DConditionConfig, UNet2DConditionModel

    text_config = CLIPTextConfig.from_dict(
        {**config.text_encoder.to_dict(), "vocab_size": len(tok), "bos_token_id": tok.bos_token_id,
         "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    )  # fmt: skip
    unet_config = UNet2DConditionConfig.from_dict(config.unet.to_dict())
    if unet_config.cross_attention_dims()[0] != text_config.hidden_size:
        raise TrainConfigError(
            f"unet.cross_attention_dim={unet_config.cross_attention_dim} must equal the text encoder's "
            f"hidden_size={text_config.hidden_size}"
        )
    return {"text_encoder": CLIPTextModel(text_config), "unet": UNet2DConditionModel(unet_config)}


def _text_encoder_params(config: ml_collections.ConfigDict, layout: folders.Layout) -> dict[str, Params | None]:
    """Text encoder name -> params of a frozen (pretrained) encoder, or None for a trained one."""
    if config.train_text_encoder:
        return {"text_encoder": None}
    if not config.pretrained_path and not config.text_encoder_path:
        raise TrainConfigError(
            "train_text_encoder=False needs a pretrained text encoder: set --config.pretrained_path or "
            "--config.text_encoder_path"
        )
    if config.text_encoder_path and layout is folders.SD:
        return {"text_encoder": weights.load_component(Path(config.text_encoder_path))[1]}
    names = [name for name in layout.networks if name.startswith("text_encoder")]
    return {name: weights.load_component(Path(config.pretrained_path) / name)[1] for name in names}
