"""Few-step sampling against the usual 50 steps: seconds per image, SD 1.5 architecture (random weights), CPU.

    python -m benchmarks.bench_few_step [--size 256] [--rounds 2]

One image, float32, each recipe as users run it: 50 ddim steps with guidance 7.5 (two UNet evaluations per step),
and the few-step recipes without classifier-free guidance (one evaluation per step): LCM (an LCM-LoRA or
LCM-distilled model) 4 steps guidance 1.0, SDXL-Lightning / Hyper-SD style euler with trailing spacing 4 steps,
TCD 4 steps gamma 0.3. Random weights: the images are noise, the time is a real model's (the same networks).
Every recipe is compiled first; then the timed runs alternate between the recipes, ``--rounds`` times, so that the
machine's load (printed) weighs on all of them alike. Prints a Markdown table: seconds per image (median over the
rounds, after compilation), compile seconds, and the speed-up over 50 ddim steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

RECIPES = {  # name: generate() arguments
    "ddim 50 steps, guidance 7.5": dict(sampler="ddim", num_inference_steps=50, guidance_scale=7.5),
    "lcm 4 steps, guidance 1.0": dict(sampler="lcm", num_inference_steps=4, guidance_scale=1.0),
    "euler trailing 4 steps, guidance 0 (Lightning)": dict(
        sampler="euler", num_inference_steps=4, guidance_scale=0.0, scheduler_config={"timestep_spacing": "trailing"}
    ),
    "tcd 4 steps, gamma 0.3, guidance 1.0": dict(sampler="tcd", num_inference_steps=4, guidance_scale=1.0, eta=0.3),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--rounds", type=int, default=2, help="timed runs per recipe, interleaved")
    parser.add_argument("--folder", help="a folder written by bench_sample.build_reference (default: afresh)")
    args = parser.parse_args()

    import sdjax
    from benchmarks.bench_sample import build_reference
    from benchmarks.common import print_table

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.folder or tmp)
        if not args.folder:
            build_reference(folder)
        pipe = sdjax.StableDiffusion.from_pretrained(folder)
        prompt = "a photograph of an astronaut riding a horse"
        common = dict(height=args.size, width=args.size)
        compile_s, times, loads = {}, {name: [] for name in RECIPES}, []
        for name, kwargs in RECIPES.items():
            negative = ["blurry"] if kwargs["guidance_scale"] > 1 else None
            pipe.generate([prompt], negative, seed=0, **common, **kwargs)
            compile_s[name] = pipe.last_timings["compile_s"]
        for round_ in range(args.rounds):
            for name, kwargs in RECIPES.items():
                negative = ["blurry"] if kwargs["guidance_scale"] > 1 else None
                start = time.perf_counter()
                pipe.generate([prompt], negative, seed=1 + round_, **common, **kwargs)
                times[name].append(time.perf_counter() - start)
                loads.append(os.getloadavg()[0])

    per_image = {name: statistics.median(t) for name, t in times.items()}
    baseline = per_image[next(iter(RECIPES))]
    rows = [
        (f"{name}: s/image, compile s, speed-up", f"{per_image[name]:.1f}, {compile_s[name]:.0f}, "
         f"{baseline / per_image[name]:.1f}x")
        for name in RECIPES
    ]  # fmt: skip
    rows.append(("load average (1 min) during the timed runs, min-max", f"{min(loads):.1f}-{max(loads):.1f}"))
    print_table(
        f"sdjax, SD 1.5 architecture (random weights), {args.size}x{args.size}, batch 1, float32, CPU "
        f"({os.cpu_count()} cores), median of {args.rounds} interleaved runs",
        rows,
    )


if __name__ == "__main__":
    main()
