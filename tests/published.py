"""Diffusers folders laid out exactly as the published SD / SDXL repositories, random weights, optionally shrunk.

The config files are the published ones (tests/fixtures/published/<name>, legacy fields and all): the model
folders get weights from random PyTorch models built from those configs and saved with ``save_pretrained``,
after which the published ``config.json`` is written back over the re-saved one, so that both sdjax and
diffusers read what users' downloads contain. The networks written are those model_index.json names (the SDXL
refiner has no ``text_encoder``). ``shrink=True`` narrows channel widths, heads and text-encoder depth, and caps
transformer depths at 2 (blocks, layers, attention placement and every other field stay as published) for the
default suite.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.reference import perturb_

FIXTURES = Path(__file__).parent / "fixtures" / "published"
TEXT_WIDTH = 64  # shrunk text encoder: 64 wide, 2 layers, one 64-dim head (as SD's text encoders' head size)


def published_config(name: str, component: str) -> dict:
    """The published ``config.json`` (or ``scheduler_config.json``) of ``component`` in model ``name``."""
    file = "scheduler_config.json" if component == "scheduler" else "config.json"
    return json.loads((FIXTURES / name / component / file).read_text())


def _shrunk_unet(config: dict, text_widths: list[int], pooled_width: int | None) -> dict:
    """``text_widths``: published widths of the text encoders whose hidden states make the context (SDXL base: 768
    and 1280); ``pooled_width``: published width of the pooled embedding of a text_time UNet (bigG's 1280)."""
    heads, blocks = config["attention_head_dim"], len(config["block_out_channels"])
    # SD 1.x: 8 heads everywhere (4-dim heads at 32 channels); SD 2.x / XL: per-block 64-dim heads, kept at 64 dims
    # (one or two heads) so that single-file loading, which assumes them, reads the shrunk model too.
    channels = ([64, 64, 128, 128] if isinstance(heads, list) else [32, 32, 64, 64])[:blocks]
    heads = [c // 64 for c in channels] if isinstance(heads, list) else heads
    depths = config.get("transformer_layers_per_block", 1)
    shrunk = {
        **config,
        "block_out_channels": channels,
        "attention_head_dim": heads,
        "cross_attention_dim": TEXT_WIDTH * len(text_widths),
    }
    if "transformer_layers_per_block" in config:
        shrunk["transformer_layers_per_block"] = (
            [min(d, 2) for d in depths] if isinstance(depths, list) else min(depths, 2)
        )
    if config.get("addition_embed_type") == "text_time":  # the time ids keep their width
        shrunk["projection_class_embeddings_input_dim"] += TEXT_WIDTH - pooled_width
    return shrunk


def _shrunk_vae(config: dict) -> dict:
    blocks = len(config["block_out_channels"])
    return {**config, "block_out_channels": [32, 32, 64, 64][:blocks]}


def _shrunk_text_encoder(config: dict) -> dict:
    return {
        **config,
        "hidden_size": TEXT_WIDTH,
        "intermediate_size": 2 * TEXT_WIDTH,
        "num_hidden_layers": 2,
        "num_attention_heads": 1,
        "projection_dim": TEXT_WIDTH,
    }


def published_folder(name: str, folder: Path, *, shrink: bool = True, seed: int = 0) -> Path:
    """Writes model ``name`` (sd15, sd21, sdxl_base, sdxl_refiner ...) in its published layout with perturbed random
    weights: the networks, tokenizers and scheduler its model_index.json names."""
    import torch
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from sdjax.tokenizer import clip_tokenizer, save_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    index = json.loads((FIXTURES / name / "model_index.json").read_text())
    present = [c for c in ("unet", "vae", "text_encoder", "text_encoder_2") if (index.get(c) or [None])[0]]
    configs = {c: published_config(name, c) for c in present}
    encoders = [c for c in ("text_encoder", "text_encoder_2") if c in configs]
    if shrink:
        pooled = configs.get("text_encoder_2", {}).get("projection_dim")
        widths = [configs[c]["hidden_size"] for c in encoders]
        configs = {
            "unet": _shrunk_unet(configs["unet"], widths, pooled),
            "vae": _shrunk_vae(configs["vae"]),
            **{c: _shrunk_text_encoder(configs[c]) for c in encoders},
        }
    models = {
        "unet": UNet2DConditionModel.from_config(configs["unet"]),
        "vae": AutoencoderKL.from_config(configs["vae"]),
    }
    for c in encoders:
        text_class = getattr(transformers, configs[c]["architectures"][0])  # CLIPTextModel[WithProjection]
        models[c] = text_class(transformers.CLIPTextConfig.from_dict(configs[c]))
    for i, (component, model) in enumerate(models.items()):
        perturb_(model, seed=seed + i)
        model.save_pretrained(folder / component, safe_serialization=True)
        (folder / component / "config.json").write_text(json.dumps(configs[component], indent=2) + "\n")
    for tokenizer_name in ("tokenizer", "tokenizer_2"):
        if not (index.get(tokenizer_name) or [None])[0]:
            continue
        tokenizer = folder / tokenizer_name
        save_tokenizer(clip_tokenizer(), tokenizer)
        (tokenizer / "tokenizer.json").unlink()  # the published folders ship vocab.json + merges.txt only
        for file in ("tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(FIXTURES / name / tokenizer_name / file, tokenizer / file)
    (folder / "scheduler").mkdir(exist_ok=True)
    shutil.copy(FIXTURES / name / "scheduler" / "scheduler_config.json", folder / "scheduler")
    shutil.copy(FIXTURES / name / "model_index.json", folder)
    return folder


def diffusers_pipeline(folder: Path):
    """diffusers' StableDiffusionPipeline loading ``folder`` from disk (no safety checker / feature extractor)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        folder, safety_checker=None, feature_extractor=None, requires_safety_checker=False, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# Published text widths by the ControlNet's context width: the text encoders whose hidden states make it, and the
# pooled embedding of SDXL's text_time conditioning.
_CONTROLNET_TEXT = {768: ([768], None), 1024: ([1024], None), 2048: ([768, 1280], 1280)}


def published_controlnet_folder(name: str, folder: Path, *, shrink: bool = True, seed: int = 0) -> Path:
    """Writes the ControlNet ``name`` (controlnet_sd15_canny, controlnet_sdxl_canny) in its published layout with
    perturbed random weights (shrunk as the UNet of its family, so that it conditions a shrunk published UNet),
    its config.json the published one (shrunk)."""
    import torch
    from diffusers import ControlNetModel

    config = shrunk_controlnet_config(name) if shrink else json.loads((FIXTURES / name / "config.json").read_text())
    torch.manual_seed(seed)
    model = perturb_(ControlNetModel.from_config(config), seed=seed)
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def shrunk_controlnet_config(name: str) -> dict:
    """The published ControlNet config ``name``, shrunk as the UNet of its family."""
    config = json.loads((FIXTURES / name / "config.json").read_text())
    return _shrunk_unet(config, *_CONTROLNET_TEXT[config["cross_attention_dim"]])


def shrunk_unet_config(name: str) -> dict:
    """The published UNet config of model ``name``, shrunk as :func:`published_folder` shrinks it."""
    index = json.loads((FIXTURES / name / "model_index.json").read_text())
    encoders = [c for c in ("text_encoder", "text_encoder_2") if (index.get(c) or [None])[0]]
    widths = [published_config(name, c)["hidden_size"] for c in encoders]
    pooled = published_config(name, "text_encoder_2")["projection_dim"] if "text_encoder_2" in encoders else None
    return _shrunk_unet(published_config(name, "unet"), widths, pooled)
