r"""Draws the shipped shapes64 model's latent space as two 8-frame spherical interpolations (docs/shapes64.md):

- docs/slerp_noise.png: one prompt, the initial noise walking from seed A's to seed B's (``generate(latents=...)``);
- docs/slerp_prompts.png: one initial noise, the text embedding walking from prompt A's to prompt B's
  (``generate(prompt_embeds=...)``).

    python docs/latent_space.py [--model sdjax/shapes64/model] [--out docs]

The noise walk samples with DDIM, whose image is a function of the initial noise alone (an ancestral sampler's
fresh noise at every step would drown the walk); the prompt walk with the model's own sampler and the same sampler
seed in every frame. Both use the model's guidance. Both walks go along the great circle
(:func:`sdjax.interpolation.slerp`): a straight line between two standard-normal noises passes through noise of
~0.71 of the usual norm, which the model never saw.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

FRAMES = 8
NOISE_WALK = {"prompt": "a red circle on a white background", "seeds": (10, 9), "sampler": "ddim"}
PROMPT_WALK = {"prompts": ("a blue square on a yellow background", "a blue circle on a yellow background"), "seed": 3}


def seed_noise(pipe, seed: int) -> np.ndarray:
    """The initial noise (h, w, C) float32 that ``pipe.generate(prompt, seed=seed)`` starts its first image from."""
    from sdjax import denoise, latents
    from sdjax.shapes64 import IMAGE_SIZE

    shape = latents.latent_shape(pipe.vae, IMAGE_SIZE, IMAGE_SIZE)
    return np.asarray(denoise.initial_noise(denoise.image_keys(seed, 1), shape)[0])


def frames(pipe, inputs: list[dict], **generate_kwargs) -> np.ndarray:
    """One ``generate`` call per frame, all with the same ``seed``: the sampler's own per-step noise (the model's
    sampler, euler_ancestral, adds fresh noise at every step) is then the same in every frame, and only the
    interpolated input changes. Returns (len(inputs), H, W, 3) float32."""
    return np.concatenate([pipe.generate(**frame, **generate_kwargs) for frame in inputs])


def noise_walk(pipe, **generate_kwargs) -> np.ndarray:
    """FRAMES images (FRAMES, H, W, 3) of NOISE_WALK's prompt, the initial noise slerped from the first seed's to
    the second's, sampled with NOISE_WALK's deterministic sampler (DDIM: the image is a function of the initial
    noise alone; frame 0 and the last are exactly ``generate(prompt, seed=s, sampler="ddim")``)."""
    from sdjax.interpolation import slerp

    a, b = (seed_noise(pipe, s) for s in NOISE_WALK["seeds"])
    noises = slerp(jnp.linspace(0, 1, FRAMES), a, b)
    kwargs = {**generate_kwargs, "sampler": NOISE_WALK["sampler"]}
    return pipe.generate(NOISE_WALK["prompt"], latents=noises, num_images_per_prompt=FRAMES, **kwargs)


def prompt_walk(pipe, **generate_kwargs) -> np.ndarray:
    """FRAMES images of one initial noise, the prompt embedding slerped from PROMPT_WALK's first prompt to the
    second's, with the model's sampler (:func:`frames`)."""
    from sdjax.interpolation import slerp

    a, b = np.asarray(pipe.encode_prompt(list(PROMPT_WALK["prompts"])))
    embeds = np.asarray(slerp(jnp.linspace(0, 1, FRAMES), a, b))
    noise = seed_noise(pipe, PROMPT_WALK["seed"])[None]
    return frames(pipe, [{"prompt_embeds": e[None], "latents": noise} for e in embeds], **generate_kwargs)


def main() -> int:
    from sdjax import StableDiffusion, images
    from sdjax.shapes64 import MODEL_DIR

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(MODEL_DIR))
    parser.add_argument("--out", default="docs", type=Path)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    start = time.perf_counter()
    pipe = StableDiffusion.from_pretrained(args.model)
    kwargs = {"num_inference_steps": args.steps, "seed": 0}
    walks = {
        "slerp_noise.png": (noise_walk(pipe, **kwargs), f"{NOISE_WALK['prompt']}; seeds {NOISE_WALK['seeds']}"),
        "slerp_prompts.png": (prompt_walk(pipe, **kwargs), " -> ".join(PROMPT_WALK["prompts"])),
    }
    for name, (frames, caption) in walks.items():
        grid = images.image_grid(frames, cols=FRAMES)
        images.save_png(grid, args.out / name, {"walk": caption, "model": args.model, "steps": args.steps})
        print(f"wrote {args.out / name}: {caption}")
    print(f"{time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
