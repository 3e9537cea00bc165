"""Text-to-image on a CUDA GPU: SD 1.5 (512x512, 50 steps) and SDXL base (1024x1024, 30 steps), bfloat16.

    pip install -e ".[cuda]"          # diffusers runs alongside when torch with CUDA is installed
    python -m benchmarks.bench_gpu [--tiny] [--skip-sdxl] [--repeats 3]

No download: each network is built from its published config (tests/fixtures/published/sd15, sdxl_base) and
filled with random weights on the device (``jax.eval_shape`` of the init for the shapes, one jitted
``jax.random.normal`` per tensor). diffusers, when ``torch.cuda.is_available()``, builds the same architectures
from the same configs with its own random init (speed does not depend on the values), bfloat16, SDPA attention.
Guidance 7.5 (SD 1.5) / 5.0 (SDXL), batch 1, Euler for SDXL, DDIM for SD 1.5, in both libraries. Prints one
Markdown table: seconds per image (fastest of ``--repeats`` after a warm-up), denoising steps per second, and
sdjax's compile time. Budget: under 8 minutes on one H100/H200 (SDXL random init and compile dominate).

``--tiny`` runs the same code on any machine (the CPU too) at 64x64 with 2 steps, float32, and with the SD 1.5
widths but SDXL replaced by its published config shrunk to two blocks: it checks the script, not the speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from benchmarks.common import print_table
from sdjax.platform import configure_cpu

PUBLISHED = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "published"
PROMPT, NEGATIVE = "a photograph of an astronaut riding a horse", "blurry, low quality"


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    family: str  # "sd" or "sdxl"
    folder: Path
    size: int
    steps: int
    guidance: float
    sampler: str


def random_params(module, seed: int, dtype) -> dict:
    """Random normal (std 0.02) params of ``module``'s shapes, made on the default device by one jitted program
    (one compile per network, no host copy)."""
    from sdjax import weights

    leaves, treedef = jax.tree.flatten(weights.param_shapes(module))

    @jax.jit
    def fill(key):
        keys = jax.random.split(key, len(leaves))
        return [0.02 * jax.random.normal(k, s.shape, dtype) for k, s in zip(keys, leaves, strict=True)]

    return jax.tree.unflatten(treedef, fill(jax.random.key(seed)))


def _configs(folder: Path, tiny: bool) -> dict[str, dict]:
    from sdjax import weights

    names = [n for n in ("unet", "vae", "text_encoder", "text_encoder_2") if (folder / n / "config.json").is_file()]
    configs = {n: weights.read_json(folder / n / "config.json") for n in names}
    if tiny and "text_encoder_2" in configs:  # SDXL: two blocks, one transformer layer, so a CPU runs it quickly
        unet = configs["unet"]
        unet.update(block_out_channels=[64, 128], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], transformer_layers_per_block=[1, 1],
                    attention_head_dim=[2, 4], norm_num_groups=32)  # fmt: skip
        for n in ("text_encoder", "text_encoder_2"):
            configs[n].update(num_hidden_layers=2)
        configs["vae"].update(block_out_channels=[32, 32, 32, 32], norm_num_groups=32)
    return configs


def build_sdjax(case: Case, dtype, tiny: bool):
    """An sdjax pipeline of ``case``'s published configs with random params on the device."""
    import sdjax
    from sdjax import schedule, tokenizer, weights

    modules, params = {}, {}
    for i, (name, config) in enumerate(_configs(case.folder, tiny).items()):
        cls, _ = weights.component_class(config.get("_class_name") or config["architectures"][0])
        module_dtype = jnp.float32 if name == "vae" and config.get("force_upcast") else dtype
        modules[name] = cls(config=cls.config_class.from_dict(config), dtype=module_dtype)
        params[name] = random_params(modules[name], i, module_dtype)
    scheduler = weights.read_json(case.folder / "scheduler" / "scheduler_config.json")
    sched = schedule.ScheduleConfig.from_dict(scheduler)
    if case.family == "sd":
        return sdjax.StableDiffusion(
            **modules,
            params=params,
            tokenizer=tokenizer.clip_tokenizer(),
            schedule=sched,
            scheduler_class="DDIMScheduler",
        )
    tokenizers = {"tokenizer": tokenizer.clip_tokenizer(), "tokenizer_2": tokenizer.clip_tokenizer(pad_token="!")}
    return sdjax.StableDiffusionXL(
        **modules, params=params, tokenizers=tokenizers, schedule=sched, scheduler_class="EulerDiscreteScheduler"
    )


def time_sdjax(case: Case, dtype, repeats: int, tiny: bool) -> dict[str, float]:
    start = time.perf_counter()
    pipe = build_sdjax(case, dtype, tiny)
    jax.block_until_ready(pipe.params)
    build_s = time.perf_counter() - start
    kwargs = dict(num_inference_steps=case.steps, guidance_scale=case.guidance, height=case.size, width=case.size,
                  sampler=case.sampler)  # fmt: skip
    start = time.perf_counter()
    pipe.generate([PROMPT], [NEGATIVE], seed=0, **kwargs)
    first_s = time.perf_counter() - start
    compile_s = pipe.last_timings.get("compile_s", float("nan"))
    times = []
    for seed in range(1, repeats + 1):
        start = time.perf_counter()
        pipe.generate([PROMPT], [NEGATIVE], seed=seed, **kwargs)
        times.append(time.perf_counter() - start)
    del pipe
    return {"s_per_image": min(times), "compile_s": compile_s, "first_s": first_s, "build_s": build_s}


def time_diffusers(case: Case, repeats: int, tiny: bool) -> dict[str, float] | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdjax import tokenizer

    configs = _configs(case.folder, tiny)
    dtype = torch.bfloat16 if not tiny else torch.float32
    unet = diffusers.UNet2DConditionModel.from_config(configs["unet"])
    vae = diffusers.AutoencoderKL.from_config(configs["vae"])
    text = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    scheduler_config = json.loads((case.folder / "scheduler" / "scheduler_config.json").read_text())
    if case.family == "sd":
        pipe = diffusers.StableDiffusionPipeline(
            vae=vae, text_encoder=text, tokenizer=tokenizer.clip_tokenizer(), unet=unet,
            scheduler=diffusers.DDIMScheduler.from_config(scheduler_config), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
    else:
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=vae, text_encoder=text, text_encoder_2=CLIPTextModelWithProjection(
                CLIPTextConfig(**configs["text_encoder_2"])), tokenizer=tokenizer.clip_tokenizer(),
            tokenizer_2=tokenizer.clip_tokenizer(pad_token="!"), unet=unet,
            scheduler=diffusers.EulerDiscreteScheduler.from_config(scheduler_config),
        )  # fmt: skip
    pipe = pipe.to("cuda", dtype)
    if case.family == "sdxl" and not tiny:
        pipe.vae.to(torch.float32)  # force_upcast, as sdjax
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(negative_prompt=NEGATIVE, num_inference_steps=case.steps, guidance_scale=case.guidance,
                  height=case.size, width=case.size, output_type="np")  # fmt: skip
    with torch.inference_mode():
        pipe(PROMPT, **kwargs)
        times = []
        for seed in range(repeats):
            torch.cuda.synchronize()
            start = time.perf_counter()
            pipe(PROMPT, generator=torch.Generator("cuda").manual_seed(seed), **kwargs)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    del pipe
    torch.cuda.empty_cache()
    return {"s_per_image": min(times)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="64x64, 2 steps, float32, small SDXL: runs anywhere")
    parser.add_argument("--skip-sdxl", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    size = lambda full: 64 if args.tiny else full  # noqa: E731
    steps = lambda full: 2 if args.tiny else full  # noqa: E731
    cases = [Case("SD 1.5", "sd", PUBLISHED / "sd15", size(512), steps(50), 7.5, "ddim")]
    if not args.skip_sdxl:
        cases.append(Case("SDXL base", "sdxl", PUBLISHED / "sdxl_base", size(1024), steps(30), 5.0, "euler"))
    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    device = jax.devices()[0]
    rows = []
    for case in cases:
        j = time_sdjax(case, dtype, args.repeats, args.tiny)
        d = time_diffusers(case, args.repeats, args.tiny)
        label = f"{case.name} {case.size}x{case.size}, {case.steps} {case.sampler} steps, guidance {case.guidance}"
        rows += [
            (f"{label}: sdjax s/image", f"{j['s_per_image']:.3f} ({case.steps / j['s_per_image']:.1f} it/s)"),
            (f"{label}: sdjax compile s (first call {j['first_s']:.1f} s)", f"{j['compile_s']:.1f}"),
            (f"{label}: sdjax random init on device s", f"{j['build_s']:.1f}"),
        ]
        if d is None:
            rows.append((f"{label}: diffusers", "skipped: torch with CUDA not installed"))
        else:
            rows += [
                (f"{label}: diffusers s/image", f"{d['s_per_image']:.3f} ({case.steps / d['s_per_image']:.1f} it/s)"),
                (f"{label}: speed ratio (diffusers / sdjax)", f"{d['s_per_image'] / j['s_per_image']:.2f}x"),
            ]
    print_table(
        f"{'TINY (script check, not a benchmark): ' if args.tiny else ''}{jnp.dtype(dtype).name}, batch 1, "
        f"{device.platform} {device.device_kind}, fastest of {args.repeats}, {time.strftime('%Y-%m-%d')}, "
        f"load average {os.getloadavg()[0]:.2f}",
        rows,
    )


if __name__ == "__main__":
    configure_cpu()
    main()
