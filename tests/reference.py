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
