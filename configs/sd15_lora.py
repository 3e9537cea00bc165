r"""DreamBooth-style LoRA on Stable Diffusion 1.5: a few pictures of one subject, one caption with a rare token.

    for f in /data/sks_dog/*.jpg; do echo "a photo of sks dog" > "${f%.*}.txt"; done   # the one caption
    python train.py --config=configs/sd15_lora.py --workdir=workdirs/sks_dog \
        --config.pretrained_path=/models/stable-diffusion-v1-5 --config.data.source=/data/sks_dog
    python -m sdjax.export workdirs/sks_dog loras/sks_dog --lora   # diffusers/PEFT + kohya .safetensors

Then ``pipe.load_lora_weights("loras/sks_dog")`` (sdjax or diffusers) and prompt "a photo of sks dog on the beach".

Rank-4 LoRA factors (alpha 4) on the UNet's attention (to_q/k/v/out), feed-forward and proj_in/out layers; the
text encoder too with --config.lora.text_encoder=True. The base model stays frozen: only the factors (1.7M
parameters at rank 4) are in the optimizer state and the checkpoints (a few MB each). AdamW at 1e-4, constant,
400 steps of batch 1, as diffusers' train_dreambooth_lora.py; bfloat16 compute on a float32 base copy.

Prior preservation (the class prior loss of DreamBooth, Ruiz et al. 2022) has no separate loss term here; it is
obtained through the data: add class images of the base model's own making to the folder, captioned with the class
prompt ("a photo of dog"; e.g. `python sample.py --model /models/stable-diffusion-v1-5 --prompt "a photo of dog"
--num-images 100 --out /data/sks_dog/prior`, then a .txt per image). With as many class images as instance images
in the folder, each batch's loss weighs both equally (prior_loss_weight = 1 in expectation).

`--config=configs/sd15_lora.py:tiny` is the smoke-test variant (16x16 images, two steps, a tiny model).
"""

import ml_collections
from ml_collections import config_dict

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The DreamBooth LoRA config; ``arg="tiny"`` gives the smoke-test variant."""
    tiny = arg == "tiny"
    if arg not in (None, "", "tiny"):
        raise ValueError(f"unknown config arg {arg!r}; accepted: tiny")
    config = ml_collections.ConfigDict()
    config.stage = "lora"
    config.seed = 0
    config.steps = 2 if tiny else 400
    config.batch_size = 2 if tiny else 1  # global, per micro-batch
    config.grad_accum_steps = 1
    config.dtype = "float32" if tiny else "bfloat16"  # compute dtype (and the frozen base's); factors stay float32
    config.remat = False

    config.pretrained_path = config_dict.placeholder(str)  # the base model (required)
    config.lora = dict(
        rank=4,
        alpha=4.0,  # the update is alpha / rank * up @ down
        unet_targets=UNET_TARGETS,  # PyTorch module names or their last parts, as PEFT's target_modules
        text_encoder=False,
        text_encoder_targets=TEXT_ENCODER_TARGETS,
    )

    config.data = dict(
        source=config_dict.placeholder(str),  # the image folder (required)
        num_train=config_dict.placeholder(int),
        split="train",
        eval_split="validation",
        data_dir=config_dict.placeholder(str),
        resolution=16 if tiny else 512,
        random_crop=False,
        random_flip=True,
        caption_dropout=0.0,
        image_key="image",
        caption_key="caption",
    )
    config.loss = dict(snr_gamma=config_dict.placeholder(float), noise_offset=0.0)
    config.optim = dict(
        lr=1e-4,
        warmup_steps=0,
        schedule="constant",
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=1e-2,
        clip_grad_norm=1.0,
    )
    config.ema_decay = 0.0  # 0: no EMA (the usual for LoRA); e.g. 0.999 keeps one of the factors
    config.ema_warmup = 10.0

    config.log_every = 1 if tiny else 10
    config.checkpoint_every = 1 if tiny else 100
    config.keep_checkpoints = 3
    config.async_checkpoints = True
    config.eval_every = 0
    config.eval_batches = 4
    config.sample_every = 0 if tiny else 100
    config.num_samples = 4
    config.sample_prompts = ("a photo of sks dog", "a photo of sks dog on the beach")
    config.sample_steps = 25
    config.sample_guidance_scale = 7.5
    # Devices (docs/sharding.md): data x fsdp; fsdp=N splits params, Adam moments and EMA over N devices.
    config.mesh = dict(data=-1, fsdp=1, min_shard_size=2**14)
    config.distributed = False
    return config
