r"""Stage 2 on shapes64: a text-conditioned latent diffusion UNet and a CLIP text encoder, trained from scratch
on the latents of the stage-1 VAE.

    python train.py --config=configs/shapes64.py --workdir=workdirs/shapes64

It needs the stage-1 workdir first (config.vae_path):

    python train.py --config=configs/shapes64_vae.py --workdir=workdirs/shapes64_vae

`--config=configs/shapes64.py:tiny` is the smoke-test variant (its VAE: configs/shapes64_vae.py:tiny in
workdirs/shapes64_vae_tiny). Sample from the result with `sdjax.StableDiffusion.from_pretrained("workdirs/shapes64")`.
"""

import ml_collections
from ml_collections import config_dict


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The stage-2 config; ``arg="tiny"`` gives the smoke-test variant."""
    tiny = arg == "tiny"
    if arg not in (None, "", "tiny"):
        raise ValueError(f"unknown config arg {arg!r}; accepted: tiny")
    config = ml_collections.ConfigDict()
    config.stage = "diffusion"
    config.seed = 0
    # 0.61 CPU-seconds (0.43 s of wall time) a step on this 2-core CPU, measured over the shipped run's last 4,500
    # steps: 14000 steps are ~8,500 CPU-s / ~100 min, what the 2-hour budget of both stages leaves after the VAE.
    config.steps = 20 if tiny else 14000
    config.batch_size = 8 if tiny else 16  # global, per micro-batch
    config.grad_accum_steps = 1
    config.dtype = "float32"  # compute dtype; params are float32 ("bfloat16" on TPU/GPU)
    config.remat = False  # recompute UNet blocks in the backward pass (saves activation memory)

    config.data = dict(
        source="shapes64",
        num_train=256 if tiny else config_dict.placeholder(int),  # shapes64 size; None: the builder's default (50k)
        split="train",
        eval_split="validation",  # the split of the validation loss (eval_every)
        data_dir=config_dict.placeholder(str),
        resolution=16 if tiny else 64,
        random_crop=False,
        random_flip=True,
        caption_dropout=0.1,  # unconditional examples for classifier-free guidance
        image_key="image",
        caption_key="caption",
    )

    # Frozen VAE: a stage-1 workdir (scaling_factor measured from the data) or a diffusers VAE folder.
    config.vae_path = "workdirs/shapes64_vae_tiny" if tiny else "workdirs/shapes64_vae"
    config.vae_config = "configs/shapes64_vae.py:tiny" if tiny else "configs/shapes64_vae.py"  # how to train vae_path
    config.vae_ema = True
    config.scaling_factor = config_dict.placeholder(float)  # None: 1 / std of the latents of a new VAE
    config.scaling_batches = 2 if tiny else 16
    config.pretrained_path = config_dict.placeholder(str)
    config.tokenizer_path = config_dict.placeholder(str)  # None: a BPE tokenizer learnt from the captions
    config.text_encoder_path = config_dict.placeholder(str)
    config.train_text_encoder = True

    # transformers CLIPTextConfig fields (vocab_size and special tokens come from the tokenizer).
    config.text_encoder = dict(
        hidden_size=32 if tiny else 128,
        intermediate_size=64 if tiny else 512,
        num_hidden_layers=1 if tiny else 3,
        num_attention_heads=2 if tiny else 4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=32 if tiny else 128,
    )
    # diffusers UNet2DConditionModel fields. Three levels (16x16, 8x8, 4x4): cheap convolutions at 16x16 (32
    # channels, no attention) and the width where the whole shape is in view, with self- and cross-attention at 8x8,
    # 4x4 and in the 4x4 mid block: ~3x cheaper per image than v1's (64, 128) at (16, 8) with more parameters (4.2M).
    config.unet = dict(
        sample_size=8 if tiny else 16,  # latent side: data resolution / VAE downsampling
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(8, 16, 32) if tiny else (32, 64, 128),
        layers_per_block=1,
        attention_head_dim=2 if tiny else 4,
        cross_attention_dim=32 if tiny else 128,
        norm_num_groups=8 if tiny else 32,
    )
    # diffusers scheduler fields (written to model/scheduler/scheduler_config.json). v-prediction on a schedule
    # rescaled to zero terminal SNR, sampled with "trailing" steps (Lin et al. 2023): training ends at pure noise as
    # sampling starts, so the model cannot lean on the data's low frequencies leaking through the last step (with
    # SD's schedule, 1200 steps gave 58% right colours and blotchy shapes; with this one 100%, issue 26).
    config.schedule = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        steps_offset=0,  # only "leading" spacing uses it
        rescale_betas_zero_snr=True,
    )
    config.scheduler_class = "DDIMScheduler"
    # What generate() and sample.py use by default with this model (generation_config.json in the model folder):
    # chosen on the tuning prompts (sdjax/shapes64/prompts.py) after training, 120 images each, crisp shapes by the
    # strict judge: ddim 50 steps at guidance 7.5 84%, at 5.0 92%; euler_ancestral at 5.0 97% (at 7.5 86%).
    # Guidance above ~5 shades the shape's interior on this schedule; an ancestral sampler's fresh noise corrects
    # the deterministic samplers' small drift of the outline.
    config.generation = dict(sampler="euler_ancestral", guidance_scale=5.0)
    config.loss = dict(
        snr_gamma=config_dict.placeholder(float),  # min-SNR-gamma weighting, e.g. 5.0; None: plain MSE
        noise_offset=0.0,  # offset noise strength, e.g. 0.05
    )

    config.optim = dict(
        lr=1e-3 if tiny else 5e-4,
        warmup_steps=0 if tiny else 200,
        schedule="cosine",
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=1e-2,
        clip_grad_norm=1.0,
    )
    config.ema_decay = 0.999  # 0 turns EMA off
    config.ema_warmup = 10.0

    config.log_every = 5 if tiny else 50
    config.checkpoint_every = 10 if tiny else 500
    config.keep_checkpoints = 3
    config.async_checkpoints = True
    config.eval_every = 10 if tiny else 1000  # validation loss on eval_batches fixed batches; 0 turns it off
    config.eval_batches = 1 if tiny else 4
    config.sample_every = 0 if tiny else 2000  # image grid from the EMA params; 0 turns it off
    config.num_samples = 8
    config.sample_prompts = (
        "a red circle on a white background",
        "a blue square on a yellow background",
        "a green triangle on a black background",
        "a yellow circle on a blue background",
    )
    config.sample_steps = 25
    config.sample_guidance_scale = 3.0
    # Devices (docs/sharding.md): data x fsdp; fsdp=N splits params, Adam moments and EMA over N devices.
    config.mesh = dict(data=-1, fsdp=1, min_shard_size=2**14)
    config.distributed = False  # True on multi-host slices: calls jax.distributed.initialize()
    return config
