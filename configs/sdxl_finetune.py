r"""Fine-tune the UNet of Stable Diffusion XL base (a local diffusers-format folder) on a folder of captioned images.

    python train.py --config=configs/sdxl_finetune.py --workdir=workdirs/sdxl_finetune \
        --config.pretrained_path=/models/stable-diffusion-xl-base-1.0 --config.data.source=/data/my_pictures

The image folder is the one configs/sd15_finetune.py reads (metadata.jsonl or name.txt captions). Only the UNet
trains; both text encoders and the VAE stay frozen (the VAE encodes in float32: its config's force_upcast) and
are copied into workdir/model with both tokenizers and the scheduler, so `sdjax.from_pretrained(workdir)` gives
a StableDiffusionXL. Every other field, and what it means, is configs/sd15_finetune.py's; this file overrides
what SDXL changes.

SDXL's conditioning (sdjax/train/families.py): prompt embeddings of both encoders, the pooled embedding, and
time ids built per example as diffusers' train_text_to_image_sdxl.py builds them: the image's original size and
the top-left corner of its crop (recorded by the input pipeline: shorter side resized to data.resolution, random
crop, flip) and the target size (data.resolution). Dropped captions (data.caption_dropout, for classifier-free
guidance) get zero embeddings, as the base model's force_zeros_for_empty_prompt samples its unconditional branch.

Memory, measured (docs/sharding.md, benchmarks/bench_sharding.py, 2026-12-06, EMA on; this config turns it off,
which saves 10.3 GiB divided by the fsdp count): the train state is 38.3 GiB; with bfloat16 compute and remat (the
defaults) one 1024x1024 example per device needs 98.2 GiB on one device, 86.8 GiB per device data-parallel and
55.8 GiB with the state split over 4 devices, of which 45.8 GiB are the step's activations, which sharding does
not split. The smallest slice that fits is a TPU v5p-8 (4 chips of 95 GiB) or four 80 GB GPUs, the state split
four ways and one example per device per micro-batch, accumulated to this config's 32:

    python train.py --config=configs/sdxl_finetune.py --workdir=... --config.pretrained_path=... \
        --config.data.source=... --config.mesh.fsdp=4 --config.batch_size=4 --config.grad_accum_steps=8

Smaller devices: fine-tune LoRA adapters instead. `--config=configs/sdxl_finetune.py:tiny` trains a tiny SDXL
folder (pretrained_path) at 16x16 for 2 steps on the CPU, a smoke test.
"""

import importlib.util
from pathlib import Path

import ml_collections


def _sd15_finetune(arg: str | None) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location("sd15_finetune", Path(__file__).with_name("sd15_finetune.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The SDXL fine-tuning config; ``arg="tiny"`` gives the smoke-test variant."""
    tiny = arg == "tiny"
    config = _sd15_finetune(arg)  # checks arg
    config.batch_size = 2 if tiny else 8  # global, per micro-batch
    config.grad_accum_steps = 1 if tiny else 4  # 32 examples per optimizer step
    config.data.update(
        resolution=16 if tiny else 1024,
        random_crop=True,  # SDXL is told where each crop lies (crop_top_left), so random crops do not leak
        random_flip=True,
        caption_dropout=0.1,
    )
    config.optim.lr = 1e-6  # diffusers' SDXL fine-tuning example
    config.ema_decay = 0.0  # EMA would add 10 GB per device; set e.g. 0.9999 where memory allows
    config.sample_prompts = ("a photograph of an astronaut riding a horse", "a watercolor painting of a lighthouse")
    config.sample_steps = 30
    config.sample_guidance_scale = 5.0  # SDXL's default guidance
    return config
