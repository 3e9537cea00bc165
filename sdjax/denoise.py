"""The one compiled denoising function: guided model, start latents (txt2img / img2img), sampler scan, decode.

``denoise(spec, params, scalars, inputs)`` is pure: everything static about a run is in the hashable
:class:`DenoiseSpec` (networks, sampler plan, which branches run), everything else is an array. Per-example
inputs (leading batch axis B):

  noise    float32 (B, h, w, C)   standard-normal initial noise
  keys     uint32 key data (B, ...)   image i's PRNG key (see :func:`image_keys`)
  cond     dict of UNet keyword inputs, each (B, ...): {"encoder_hidden_states": (B, 77, D)}
  uncond   the same for the negative prompt (guided runs only)
  init     float32 (B, H, W, 3) in [-1, 1], img2img only

and scalars ``{"guidance": f32, "eta": f32}`` shared by the batch. A new denoiser input lands here and nowhere
else: added conditioning (SDXL text_embeds / time_ids) is one more entry of ``cond``; inpainting's mask and masked
latents are inputs concatenated to the model's latents in :func:`guided_model`; ControlNet residuals are computed
from their own input inside :func:`guided_model` and passed to the UNet.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from sdjax import latents, samplers

TRACE_COUNT = 0  # how many times the denoising function was traced (compiled); tests read it

# Image i's random streams all derive from fold_in(key(seed), i), each under its own tag, so that the initial
# noise, the img2img posterior sample and the sampler's per-step noise are independent of one another.
INITIAL_NOISE, POSTERIOR, SAMPLER = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class DenoiseSpec:
    """What is static about a denoising run; with the input shapes and devices, the key of its compiled program.

    unet, vae: flax modules (hashable); plan: the sampler plan; guided: classifier-free guidance (two branches
    per evaluation); img2img: start from ``inputs["init"]`` noised to the plan's first step."""

    unet: Any
    vae: Any
    plan: samplers.SamplerPlan
    guided: bool
    img2img: bool = False


def image_keys(seed: int, n: int) -> jax.Array:
    """(n,) PRNG keys, key i = fold_in(key(seed), i): image i's randomness whatever the batch split."""
    return jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(n))


def initial_noise(keys: jax.Array, shape: tuple[int, int, int]) -> jax.Array:
    """Standard-normal initial noise (n, *shape) float32, image i's from its key ``keys[i]``."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, INITIAL_NOISE), shape))(keys)


def _tagged(keys: jax.Array, tag: int) -> jax.Array:
    return jax.vmap(lambda k: jax.random.fold_in(k, tag))(keys)


def guided_model(spec: DenoiseSpec, params: Any, inputs: dict, guidance: jax.Array) -> samplers.ModelFn:
    """The sampler's model: (x (B, h, w, C) float32, t) -> float32 UNet output, with classifier-free guidance
    uncond + guidance * (cond - uncond) when ``spec.guided`` (one UNet call on the 2B batch)."""
    unet = spec.unet

    def call(x, t, cond):
        return unet.apply({"params": params["unet"]}, x.astype(unet.dtype), t, **cond).astype(jnp.float32)

    def model_fn(x, t):
        if not spec.guided:
            return call(x, t, inputs["cond"])
        both = jax.tree.map(lambda u, c: jnp.concatenate([u, c]), inputs["uncond"], inputs["cond"])
        out_uncond, out_cond = jnp.split(call(jnp.concatenate([x, x]), t, both), 2)
        return out_uncond + guidance * (out_cond - out_uncond)

    return model_fn


def start_latents(spec: DenoiseSpec, params: Any, inputs: dict) -> jax.Array:
    """x at the plan's first step, float32 (B, h, w, C): the scaled noise (txt2img), or the init image's
    latents (a posterior sample) noised to that step (img2img)."""
    if not spec.img2img:
        return samplers.initial_latents(spec.plan, inputs["noise"])
    keys = _tagged(jax.random.wrap_key_data(inputs["keys"]), POSTERIOR)
    vae, init = spec.vae, inputs["init"]
    shape = latents.latent_shape(vae, init.shape[1], init.shape[2])
    eps = jax.vmap(lambda k: jax.random.normal(k, shape))(keys)
    return samplers.noised_latents(spec.plan, latents.encode(vae, params["vae"], init, eps), inputs["noise"])


def denoise(spec: DenoiseSpec, params: Any, scalars: dict, inputs: dict, progress: Any = None) -> jax.Array:
    """The whole run: start latents, ``spec.plan`` as one ``lax.scan`` over the guided model, VAE decode.

    params: {"unet": ..., "vae": ...}; scalars: {"guidance", "eta"} float32 scalars; inputs: as the module
    docstring. progress: optional host callback per evaluation. Returns float32 images (B, H, W, 3) in [0, 1].
    """
    global TRACE_COUNT
    TRACE_COUNT += 1  # Python side effect: runs once per trace, never at run time (tested)
    model_fn = guided_model(spec, params, inputs, scalars["guidance"])
    x = start_latents(spec, params, inputs)
    keys = _tagged(jax.random.wrap_key_data(inputs["keys"]), SAMPLER)
    x0 = samplers.sample(spec.plan, model_fn, x, keys, eta=scalars["eta"], progress=progress)
    return latents.decode(spec.vae, params["vae"], x0)


def attention_scores_bytes(unet: Any, batch: int, latent_height: int, latent_width: int) -> int:
    """Bytes of the largest self-attention score matrix (batch, heads, tokens, tokens) of one UNet evaluation: a
    lower bound on its peak memory wherever attention is not fused (XLA on CPU and TPU; cuDNN's flash attention
    on GPU never holds it). ``batch`` counts both guidance branches."""
    cfg = unet.config
    itemsize = 4 if cfg.upcast_attention else jnp.dtype(unet.dtype).itemsize
    sizes = [
        batch * heads * ((latent_height >> i) * (latent_width >> i)) ** 2 * itemsize
        for i, (block, heads) in enumerate(zip(cfg.down_block_types, cfg.heads(), strict=True))
        if block.startswith("CrossAttn")
    ]
    return max(sizes, default=0)


def compiled_denoise(spec: DenoiseSpec, num_devices: int, progress: bool = False) -> Any:
    """``denoise`` jitted on one device, or pmapped over ``num_devices`` (params replicated, scalars shared,
    inputs with a leading device axis). With ``progress`` a tqdm bar follows the scan."""
    bar = ProgressBar(spec.plan.num_evaluations) if progress else None

    def fn(params, scalars, inputs):
        return denoise(spec, params, scalars, inputs, bar)

    return jax.pmap(fn, in_axes=(0, None, 0)) if num_devices > 1 else jax.jit(fn)


class ProgressBar:
    """tqdm over the scan's evaluations, fed by a host callback (every device calls it; the bar shows the
    furthest evaluation)."""

    def __init__(self, total: int):
        self.total, self.bar = total, None

    def __call__(self, step: Any) -> None:
        from tqdm.auto import tqdm

        done = int(step) + 1
        if self.bar is None or (done == 1 and self.bar.n >= self.total):
            self.bar = tqdm(total=self.total, desc="sampling", leave=False)
        if done > self.bar.n:
            self.bar.update(done - self.bar.n)
        if self.bar.n >= self.total:
            self.bar.close()
