r"""Teaches sdjax/shapes64/model a shape word it has never seen, "diamond", with a LoRA, and draws docs/lora_diamond.png
(the README's before/after picture): top row the shipped model, bottom row the same model with the LoRA, same
prompts and seeds.

    python docs/lora_diamond.py                 # data, training (configs/shapes64_lora.py), export, picture
    python docs/lora_diamond.py --data-only     # only the image folder (workdirs/diamond_images)

Why a shape and not a colour ("purple"): the shipped model's VAE was trained on the six palette colours only and
encodes any other colour as one of them (measured: purple (140, 50, 190) comes back green on white, blue on black;
of a 5x5x5 RGB grid, no colour 90+ away from the palette is reconstructed within 80 of itself on every background).
The diffusion loss works on the VAE's latents, so no UNet or text-encoder LoRA can teach a new colour to this model;
a new shape, which the VAE reconstructs (mean error ~2/255 on diamonds), it can.

Steps: (1) the image folder: diamonds drawn by sdjax/shapes64/scene.py, captioned "a <colour> diamond on a
<background> background", plus as many ordinary shapes64 examples (prior preservation); (2) train.py's LoRA stage
in workdirs/shapes64_lora (resumes if it exists); (3) `python -m sdjax.export ... --lora` into workdirs/diamond_lora;
(4) the picture, the LoRA loaded from the exported diffusers file with ``load_lora_weights``. Prints the wall
time of each step.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PROMPTS = (
    "a red diamond on a white background",
    "a blue diamond on a yellow background",
    "a green diamond on a black background",
    "a yellow diamond on a blue background",
    "a red square on a white background",  # controls: the shapes the model knew must keep their meaning
    "a blue circle on a yellow background",
)


def write_data(folder: Path, num_new: int = 96, seed: int = 0) -> None:
    """``num_new`` diamonds (random palette colours, backgrounds, sizes and places) and as many shapes64 training
    examples, PNGs with metadata.jsonl captions."""
    from PIL import Image

    from sdjax.shapes64 import scene

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(num_new):
        s = scene.sample_scene(rng)
        image = scene.render(s["color"], "diamond", s["background"], s["cx"], s["cy"], s["size"])
        rows.append((f"diamond_{i:03d}.png", image, scene.caption(s["color"], "diamond", s["background"])))
        ex = scene.example(seed, "train", i)
        rows.append((f"prior_{i:03d}.png", ex["image"], ex["caption"]))
    for name, image, _ in rows:
        Image.fromarray(image).save(folder / name)
    lines = [json.dumps({"file_name": name, "text": text}) for name, _, text in rows]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def draw(base: str, lora_file: Path, out: Path, steps: int = 25, guidance: float = 3.0) -> None:
    """Top row: ``base``; bottom row: ``base`` with ``lora_file``; PROMPTS left to right, seed 0."""
    import sdjax
    from sdjax import images

    pipe = sdjax.StableDiffusion.from_pretrained(base)
    kwargs = dict(num_inference_steps=steps, guidance_scale=guidance, seed=0)
    before = pipe.generate(list(PROMPTS), **kwargs)
    pipe.load_lora_weights(lora_file)
    after = pipe.generate(list(PROMPTS), **kwargs)
    grid = images.image_grid(np.concatenate([before, after]), cols=len(PROMPTS))
    images.save_png(grid, out, {"rows": "sdjax/shapes64/model | + diamond LoRA", "prompts": " | ".join(PROMPTS)})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="workdirs/diamond_images", help="image folder to write")
    parser.add_argument("--workdir", default="workdirs/shapes64_lora")
    parser.add_argument("--lora", default="workdirs/diamond_lora", help="export folder")
    parser.add_argument("--out", default="docs/lora_diamond.png")
    parser.add_argument("--data-only", action="store_true")
    args, train_overrides = parser.parse_known_args()  # the rest goes to train.py (--config.steps=...)
    start = time.monotonic()
    if not (Path(args.data) / "metadata.jsonl").is_file():
        write_data(Path(args.data))
    print(f"data: {args.data} ({time.monotonic() - start:.0f} s)")
    if args.data_only:
        return 0
    t = time.monotonic()
    subprocess.run([sys.executable, "train.py", "--config=configs/shapes64_lora.py", f"--workdir={args.workdir}",
                    f"--config.data.source={args.data}", *train_overrides], cwd=REPO, check=True)  # fmt: skip
    print(f"training: {time.monotonic() - t:.0f} s")
    t = time.monotonic()
    export = [sys.executable, "-m", "sdjax.export", args.workdir, args.lora, "--lora", "--overwrite"]
    subprocess.run(export, cwd=REPO, check=True)
    draw("sdjax/shapes64/model", Path(args.lora) / "pytorch_lora_weights.safetensors", Path(args.out))
    print(f"export and picture: {time.monotonic() - t:.0f} s; total {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
