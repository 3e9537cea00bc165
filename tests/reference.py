"""Random-weight PyTorch reference pipelines (diffusers 0.42 / transformers 5), built offline for parity tests."""

from __future__ import annotations

from pathlib import Path

import torch

PROMPTS = ["a red circle on a blue background", "a green square on a white background"]
NEGATIVE = ["a yellow triangle", "a black circle"]
WORDS = PROMPTS + NEGATIVE + ["blurry", "photo of a cat", "an astronaut riding a horse on the moon"]

SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    skip_prk_steps=True,
    timestep_spacing="leading",
)


def perturb_(model: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Adds noise to every parameter, so that no zero-initialised layer (conv_out, proj_out) hides a bug."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return model.eval()


def tiny_pipeline(folder: Path, *, sd2: bool = False, prediction_type: str = "epsilon"):
    """A tiny SD1-style (conv projections, int head dim, quick_gelu) or SD2-style (linear projections, per-block
    head dims, upcast_attention, gelu) StableDiffusionPipeline with perturbed random weights, saved to ``folder``."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdjax.tokenizer import build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer(WORDS, folder / "_tokenizer")
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=1,  # 64-dim heads, as SD's text encoders (and single-file loading) have
            max_position_embeddings=77,
            hidden_act="gelu" if sd2 else "quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=(2, 4) if sd2 else 8,  # SD 1.x: 8 heads, as single-file loading assumes
        use_linear_projection=sd2,
        upcast_attention=sd2,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 32),
        latent_channels=4,
        norm_num_groups=32,
        sample_size=16,
    )
    for i, model in enumerate((text_encoder, unet, vae)):
        perturb_(model, seed=i)
    scheduler = DDIMScheduler.from_config({**SCHEDULER, "prediction_type": prediction_type})
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


SDXL_SCHEDULER = dict(
    SCHEDULER,
    interpolation_type="linear",
    prediction_type="epsilon",
    sample_max_value=1.0,
    trained_betas=None,
    use_karras_sigmas=False,
)  # stabilityai/stable-diffusion-xl-base-1.0's scheduler_config.json (EulerDiscreteScheduler)


def _tiny_clip_config(tokenizer, projection: bool, **overrides):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32 if projection else 64,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=1,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=32,
        bos_token_id=tokenizer.bos_token_id,
        # SDXL's OpenCLIP encoder carries the legacy eos_token_id 2 (pooling at the argmax of the ids), as published.
        eos_token_id=2 if projection else tokenizer.eos_token_id,
        pad_token_id=1,
        **overrides,
    )


def tiny_sdxl_pipeline(folder: Path, *, refiner: bool = False):
    """A tiny SDXL base (two text encoders, 6 time ids) or refiner (text_encoder_2 only, aesthetic score: 5 time
    ids, ``requires_aesthetics_score``) diffusers pipeline with perturbed random weights, saved to ``folder``: the
    published layouts' options (text_time, per-block transformer depths, linear projections, no attention in
    the first down block, a force_upcast VAE with scaling factor 0.13025, Euler) at toy widths."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from sdjax.tokenizer import build_tokenizer

    torch.manual_seed(1)
    tokenizer = build_tokenizer(WORDS, folder / "_tokenizer")
    tokenizer_2 = CLIPTokenizer.from_pretrained(folder / "_tokenizer", pad_token="!")  # OpenCLIP pads with "!"
    text_encoder = None if refiner else CLIPTextModel(_tiny_clip_config(tokenizer, projection=False))
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_clip_config(tokenizer, projection=True))
    time_ids = 5 if refiner else 6
    context = 32 if refiner else 64 + 32
    unet = UNet2DConditionModel(
        sample_size=8,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=context,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * time_ids + 32,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 32),
        latent_channels=4,
        norm_num_groups=32,
        sample_size=16,
        scaling_factor=0.13025,
        force_upcast=True,
    )
    for i, model in enumerate((text_encoder, text_encoder_2, unet, vae)):
        if model is not None:
            perturb_(model, seed=10 + i)
    scheduler = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER)
    common = dict(vae=vae, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)
    if refiner:
        pipe = StableDiffusionXLImg2ImgPipeline(
            text_encoder=None, tokenizer=None, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
            **common,
        )  # fmt: skip
    else:
        pipe = StableDiffusionXLPipeline(text_encoder=text_encoder, tokenizer=tokenizer, **common)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe
