r"""Stage 1 on shapes64: train the VAE (AutoencoderKL, 64x64 images -> 16x16x4 latents).

    python train.py --config=configs/shapes64_vae.py --workdir=workdirs/shapes64_vae

Then stage 2 (configs/shapes64.py) reads this workdir. `--config=configs/shapes64_vae.py:tiny` shrinks the model,
image size and run to a smoke test of a few seconds (workdir e.g. workdirs/shapes64_vae_tiny).
"""

import ml_collections
from ml_collections import config_dict


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The stage-1 config; ``arg="tiny"`` gives the smoke-test variant."""
    tiny = arg == "tiny"
    if arg not in (None, "", "tiny"):
        raise ValueError(f"unknown config arg {arg!r}; accepted: tiny")
    config = ml_collections.ConfigDict()
    config.stage = "vae"
    config.seed = 0
    # ~0.4 s/step on a 2-core CPU: about 20 minutes (2 GFLOP per image and training step).
    config.steps = 20 if tiny else 3000
    config.batch_size = 8 if tiny else 16  # global, per micro-batch
    config.grad_accum_steps = 1
    config.dtype = "float32"  # compute dtype; params are float32 ("bfloat16" on TPU/GPU)

    config.data = dict(
        source="shapes64",
        num_train=256 if tiny else config_dict.placeholder(int),  # shapes64 size; None: the builder's default (50k)
        split="train",
        eval_split="validation",  # the split of the validation loss (eval_every)
        data_dir=config_dict.placeholder(str),
        resolution=16 if tiny else 64,
        random_crop=False,
        random_flip=True,
        caption_dropout=0.0,
        image_key="image",
        caption_key="caption",
    )

    # diffusers AutoencoderKL fields.
    config.vae = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * (2 if tiny else 3),
        up_block_types=("UpDecoderBlock2D",) * (2 if tiny else 3),
        block_out_channels=(8, 16) if tiny else (16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4 if tiny else 8,
        sample_size=16 if tiny else 64,
        scaling_factor=1.0,  # stage 2 measures the real one from the latents
    )
    config.loss = dict(reconstruction="l1", kl_weight=1e-6, sample_posterior=True)

    config.optim = dict(
        lr=1e-3,
        warmup_steps=0 if tiny else 200,
        schedule="cosine",
        b1=0.9,
        b2=0.99,
        eps=1e-8,
        weight_decay=0.0,
        clip_grad_norm=1.0,
    )
    config.ema_decay = 0.999  # 0 turns EMA off
    config.ema_warmup = 10.0

    config.log_every = 5 if tiny else 50
    config.checkpoint_every = 10 if tiny else 250
    config.keep_checkpoints = 3
    config.async_checkpoints = True
    config.eval_every = 10 if tiny else 250  # validation loss on eval_batches fixed batches; 0 turns it off
    config.eval_batches = 1 if tiny else 4
    config.sample_every = 0 if tiny else 250  # reconstructions grid from the EMA params; 0 turns it off
    config.num_samples = 8
    # Devices (docs/sharding.md): data x fsdp; fsdp=N splits params, Adam moments and EMA over N devices.
    config.mesh = dict(data=-1, fsdp=1, min_shard_size=2**14)
    config.distributed = False  # True on multi-host slices: calls jax.distributed.initialize()
    return config
