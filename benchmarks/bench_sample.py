"""Full text-to-image sample: SD 1.5 architecture, random weights shared by sdjax and diffusers (PyTorch), CPU.

    python benchmarks/bench_sample.py [--steps 50] [--size 256] [--sampler ddim]
    python -m benchmarks.bench_sample --dtypes --steps 10   # sdjax float32 vs bfloat16 on the same machine

One guided 256x256 image, 50 steps, float32. Each library runs in its own subprocess so that peak memory
(max RSS) is its own; sdjax runs once with no compile cache (the library's default) and twice more with one
(sample.py's first and second runs: the second reads the compiled program). Prints a Markdown table: seconds per
image after compilation, compile time, peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_reference(folder: Path) -> None:
    """SD 1.5-architecture StableDiffusionPipeline with random weights and a small tokenizer, saved to folder."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from benchmarks.common import SD15_TEXT, SD15_UNET, SD15_VAE
    from sdjax.tokenizer import build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer(["a photograph of an astronaut riding a horse", "blurry"], folder / "_tok")
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**SD15_VAE),
        text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_TEXT)),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(**SD15_UNET),
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(folder, safe_serialization=True)


def run_one(
    library: str, folder: str, steps: int, size: int, sampler: str, dtype: str = "float32", cache: str | None = None
) -> dict:
    """One library's two samples in this process: seconds per image after compiling, compile seconds, peak RSS.
    ``cache``: sdjax's compile cache folder (as sample.py turns it on), else none."""
    import resource

    prompt, negative = "a photograph of an astronaut riding a horse", "blurry"
    if library == "diffusers":
        import diffusers
        import torch

        pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
        pipe.set_progress_bar_config(disable=True)
        names = {"ddim": "DDIMScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler", "euler": "EulerDiscreteScheduler"}
        pipe.scheduler = getattr(diffusers, names[sampler]).from_config(pipe.scheduler.config)
        kwargs = dict(negative_prompt=negative, num_inference_steps=steps, height=size, width=size, output_type="np")
        with torch.no_grad():
            pipe(prompt, **{**kwargs, "num_inference_steps": 2})  # warm-up
            start = time.perf_counter()
            pipe(prompt, generator=torch.Generator().manual_seed(0), **kwargs)
        per_image, compile_s = time.perf_counter() - start, 0.0
    else:
        import sdjax

        if cache:
            sdjax.enable_compile_cache(cache)
        pipe = sdjax.StableDiffusion.from_pretrained(folder, dtype=dtype)
        kwargs = dict(num_inference_steps=steps, height=size, width=size, sampler=sampler)
        pipe.generate([prompt], [negative], seed=0, **kwargs)
        compile_s = pipe.last_timings["compile_s"]
        pipe.generate([prompt], [negative], seed=1, **kwargs)
        per_image = pipe.last_timings["generate_s"]
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"per_image": per_image, "compile": compile_s, "peak_gb": peak_gb}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--sampler", default="ddim", choices=("ddim", "dpmpp_2m", "euler"))
    parser.add_argument("--only", choices=("diffusers", "sdjax"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help="a folder written by build_reference (default: written afresh)")
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--dtypes", action="store_true", help="sdjax float32 vs bfloat16 instead of diffusers")
    args = parser.parse_args()
    if args.only:
        print(json.dumps(run_one(args.only, args.folder, args.steps, args.size, args.sampler, args.dtype, args.cache)))
        return
    runs = {"float32": ("sdjax", "float32", None), "bfloat16": ("sdjax", "bfloat16", None)} if args.dtypes else None
    runs = runs or {
        "diffusers": ("diffusers", "float32", None),
        "sdjax": ("sdjax", "float32", None),
        "sdjax cache fill": ("sdjax", "float32", "cache"),  # sample.py's first run: fills the compile cache
        "sdjax cache warm": ("sdjax", "float32", "cache"),  # its second: the program read from the cache
    }

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or tmp
        if not args.folder:
            build_reference(Path(tmp))
        results = {}
        for name, (library, dtype, cache) in runs.items():
            cmd = [sys.executable, "-m", "benchmarks.bench_sample", "--only", library, "--folder", folder]
            cmd += ["--steps", str(args.steps), "--size", str(args.size), "--sampler", args.sampler, "--dtype", dtype]
            cmd += ["--cache", str(Path(tmp) / "compile_cache")] if cache else []
            out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
            results[name] = json.loads(out.strip().splitlines()[-1])
            results[name]["load"] = os.getloadavg()[0]

    from benchmarks.common import print_table

    if args.dtypes:
        rows = [
            (f"sdjax {name} s/image, compile s, peak GB, load", f"{r['per_image']:.1f}, {r['compile']:.1f}, "
             f"{r['peak_gb']:.1f}, {r['load']:.1f}")
            for name, r in results.items()
        ]  # fmt: skip
        rows.append(
            (
                "bfloat16 time / float32 time",
                f"{results['bfloat16']['per_image'] / results['float32']['per_image']:.2f}",
            )
        )
        print_table(f"sdjax SD 1.5 architecture, {args.size}x{args.size}, {args.steps} {args.sampler} steps, CPU", rows)
        return

    d, j, w = results["diffusers"], results["sdjax"], results["sdjax cache warm"]
    print_table(
        f"SD 1.5 architecture, {args.size}x{args.size}, {args.steps} {args.sampler} steps, guidance 7.5, "
        "batch 1, float32, CPU",
        [
            ("diffusers (PyTorch) s/image", f"{d['per_image']:.1f}"),
            ("sdjax s/image (after compile)", f"{j['per_image']:.1f}"),
            ("speed-up (diffusers / sdjax)", f"{d['per_image'] / j['per_image']:.2f}x"),
            (f"sdjax compile s (whole {args.steps}-step scan + VAE)", f"{j['compile']:.1f}"),
            ("peak memory diffusers GiB", f"{d['peak_gb']:.2f}"),
            ("peak memory sdjax GiB (compiling)", f"{j['peak_gb']:.2f}"),
            ("peak memory sdjax GiB (program from the compile cache, sample.py's second run)", f"{w['peak_gb']:.2f}"),
            ("load average (1 min) after diffusers / sdjax", f"{d['load']:.1f} / {j['load']:.1f}"),
        ],
    )


if __name__ == "__main__":
    main()
