r"""Fine-tune Stable Diffusion 1.5 (a local diffusers-format folder) on a folder of captioned images, 512x512.

    python train.py --config=configs/sd15_finetune.py --workdir=workdirs/sd15_finetune \
        --config.pretrained_path=/models/stable-diffusion-v1-5 --config.data.source=/data/my_pictures

The image folder holds images with one caption each: metadata.jsonl lines {"file_name": ..., "text": ...} or a
name.txt beside each name.png / name.jpg (sdjax/data/imagefolder.py). Undecodable images are skipped.
Only the UNet trains (AdamW, constant lr 1e-5, EMA as diffusers' train_text_to_image.py); the text encoder and
the VAE stay frozen and are copied into workdir/model with the tokenizer and scheduler.

Memory, measured (docs/sharding.md, benchmarks/bench_sharding.py, 2026-12-06): the train state (float32 params,
AdamW moments, EMA) is 12.8 GiB; with bfloat16 compute and remat (the defaults here) one 512x512 example per device
needs 27.9 GiB on one device, 25.0 GiB per device data-parallel, 13.4 GiB with the state split over 4 devices.
The smallest TPU slice that fits is a v5e-4 (4 chips of 16 GiB), the state split four ways and one example per chip
per micro-batch, accumulated to this config's 32:

    python train.py --config=configs/sd15_finetune.py --workdir=... --config.pretrained_path=... \
        --config.data.source=... --config.mesh.fsdp=4 --config.batch_size=4 --config.grad_accum_steps=8

Data-parallel (the default, fsdp=1) needs 32 GiB devices (TPU v4 / v6e, A100 40 GB).
`--config=configs/sd15_finetune.py:tiny` shrinks resolution, batch and run for a smoke test (with a tiny model).
"""

import ml_collections
from ml_collections import config_dict


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The fine-tuning config; ``arg="tiny"`` gives the smoke-test variant."""
    tiny = arg == "tiny"
    if arg not in (None, "", "tiny"):
        raise ValueError(f"unknown config arg {arg!r}; accepted: tiny")
    config = ml_collections.ConfigDict()
    config.stage = "diffusion"
    config.seed = 0
    config.steps = 2 if tiny else 15000
    config.batch_size = 2 if tiny else 32  # global, per micro-batch
    config.grad_accum_steps = 1
    config.dtype = "float32" if tiny else "bfloat16"  # compute dtype; params stay float32
    config.remat = not tiny

    config.pretrained_path = config_dict.placeholder(str)  # diffusers Stable Diffusion folder (required)
    config.train_text_encoder = False
    config.vae_path = config_dict.placeholder(str)  # None: the pretrained model's vae/
    config.vae_ema = True
    config.scaling_factor = config_dict.placeholder(float)  # None: the VAE's own (0.18215 for SD 1.x)
    config.scaling_batches = 0
    config.tokenizer_path = config_dict.placeholder(str)
    config.text_encoder_path = config_dict.placeholder(str)

    config.data = dict(
        source=config_dict.placeholder(str),  # the image folder (required), or a TFDS name
        num_train=config_dict.placeholder(int),
        split="train",
        eval_split="validation",  # the split of the validation loss (eval_every)
        data_dir=config_dict.placeholder(str),
        resolution=16 if tiny else 512,
        random_crop=False,
        random_flip=True,
        caption_dropout=0.0,
        image_key="image",
        caption_key="caption",
    )
    config.loss = dict(
        snr_gamma=config_dict.placeholder(float),  # e.g. 5.0 for min-SNR weighting
        noise_offset=0.0,
    )
    config.optim = dict(
        lr=1e-5,
        warmup_steps=0,
        schedule="constant",
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=1e-2,
        clip_grad_norm=1.0,
    )
    config.ema_decay = 0.9999  # 0 turns EMA off (saves one UNet copy of memory)
    config.ema_warmup = 10.0

    config.log_every = 1 if tiny else 50
    config.checkpoint_every = 1 if tiny else 1000
    config.keep_checkpoints = 3
    config.async_checkpoints = True
    config.eval_every = 0  # validation loss every N steps; needs a validation/ folder (or split) in data.source
    config.eval_batches = 4
    config.sample_every = 0 if tiny else 1000  # image grid from the EMA params; 0 turns it off
    config.num_samples = 4
    config.sample_prompts = ("a photograph of an astronaut riding a horse", "a watercolor painting of a lighthouse")
    config.sample_steps = 25
    config.sample_guidance_scale = 7.5
    # Devices (docs/sharding.md): data x fsdp; fsdp=N splits params, Adam moments and EMA over N devices.
    config.mesh = dict(data=-1, fsdp=1, min_shard_size=2**14)
    config.distributed = False  # True on multi-host slices: calls jax.distributed.initialize()
    return config
