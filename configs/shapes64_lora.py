r"""A LoRA that teaches the shipped shapes64 model (sdjax/shapes64/model) a shape word it has never seen: "diamond".

    python docs/lora_diamond.py            # data folder, training, export and docs/lora_diamond.png

or step by step:

    python docs/lora_diamond.py --data-only                 # writes workdirs/diamond_images
    python train.py --config=configs/shapes64_lora.py --workdir=workdirs/shapes64_lora
    python -m sdjax.export workdirs/shapes64_lora workdirs/diamond_lora --lora

The image folder holds diamonds drawn by sdjax/shapes64/scene.py (captions "a red diamond on a white background")
and as many ordinary shapes64 examples with their own captions: prior preservation through the data, so the other
shapes keep their meaning. Rank-8 factors on the UNet's attention, feed-forward and projection layers and the text
encoder's attention: the model's tokenizer spells "diamond" out in pieces, so the text encoder has to learn to make
something of them. (Not a colour such as "purple": this model's VAE cannot draw colours outside its palette; see
docs/lora_diamond.py.)

`--config=configs/shapes64_lora.py:tiny` is the smoke-test variant (a few steps).
"""

import ml_collections
from ml_collections import config_dict

from sdjax.shapes64 import MODEL_DIR

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The diamond LoRA config; ``arg="tiny"`` gives the smoke-test variant."""
    tiny = arg == "tiny"
    if arg not in (None, "", "tiny"):
        raise ValueError(f"unknown config arg {arg!r}; accepted: tiny")
    config = ml_collections.ConfigDict()
    config.stage = "lora"
    config.seed = 0
    config.steps = 4 if tiny else 300
    config.batch_size = 4 if tiny else 16
    config.grad_accum_steps = 1
    config.dtype = "float32"
    config.remat = False

    config.pretrained_path = str(MODEL_DIR)
    config.lora = dict(
        rank=8,
        alpha=8.0,
        unet_targets=UNET_TARGETS,
        text_encoder=True,
        text_encoder_targets=TEXT_ENCODER_TARGETS,
    )
    config.data = dict(
        source="workdirs/diamond_images",  # written by `python docs/lora_diamond.py --data-only`
        num_train=config_dict.placeholder(int),
        split="train",
        eval_split="validation",
        data_dir=config_dict.placeholder(str),
        resolution=64,
        random_crop=False,
        random_flip=True,
        caption_dropout=0.1,  # keeps the unconditional branch of classifier-free guidance
        image_key="image",
        caption_key="caption",
    )
    config.loss = dict(snr_gamma=config_dict.placeholder(float), noise_offset=0.0)
    config.optim = dict(
        lr=2e-3,
        warmup_steps=0 if tiny else 20,
        schedule="constant",
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=0.0,
        clip_grad_norm=1.0,
    )
    config.ema_decay = 0.0
    config.ema_warmup = 10.0

    config.log_every = 1 if tiny else 25
    config.checkpoint_every = 2 if tiny else 100
    config.keep_checkpoints = 2
    config.async_checkpoints = True
    config.eval_every = 0
    config.eval_batches = 1
    config.sample_every = 0
    config.num_samples = 4
    config.sample_prompts = ("a red diamond on a white background", "a blue diamond on a yellow background")
    config.sample_steps = 25
    config.sample_guidance_scale = 3.0
    # Devices (docs/sharding.md): data x fsdp; fsdp=N splits params, Adam moments and EMA over N devices.
    config.mesh = dict(data=-1, fsdp=1, min_shard_size=2**14)
    config.distributed = False
    return config
