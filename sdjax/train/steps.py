"""The per-device update steps of both stages, and their ``pmap``.

A step takes (state, frozen, batch, rng) and returns (state, metrics):
  state: :class:`TrainState` (replicated), donated to the step so its buffers are reused in place;
  frozen: component name -> params of the frozen components (replicated, e.g. the stage-2 VAE);
  batch: {"image": (B, H, W, 3) float32 in [-1, 1], "input_ids": (B, 77) int32} per device;
  rng: the run's key, broadcast.
Gradients and metrics are averaged over devices with ``lax.pmean``.

Randomness: the step key is ``fold_in(rng, step)``; each example then gets ``fold_in(step_key, global index)``
with global index = device index * B + position. Every example thus sees the same noise however the global batch
is split over devices (and hosts), so 1 device and N devices make the same update.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sdjax import schedule
from sdjax.train import losses
from sdjax.train.state import TrainState, apply_update

AXIS = "batch"
Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
StepFn = Callable[[TrainState, dict, Batch, jax.Array], tuple[TrainState, Metrics]]


def example_keys(rng: jax.Array, step: jax.Array, batch_size: int, num_streams: int) -> jax.Array:
    """Per-example keys, independent of the device layout: (num_streams, B) keys (one stream per random
    quantity) for the B examples of this device. Call inside ``pmap(axis_name=AXIS)``."""
    step_key = jax.random.fold_in(rng, step)
    index = lax.axis_index(AXIS) * batch_size + jnp.arange(batch_size)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(step_key, index)
    return jax.vmap(lambda k: jax.random.split(k, num_streams), out_axes=1)(keys)


def _normal(keys: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)


def _finish(state: TrainState, grads: Any, metrics: Metrics, config: ml_collections.ConfigDict):
    grads = lax.pmean(grads, AXIS)
    metrics = {**metrics, "grad_norm": optax.global_norm(grads)}
    state = apply_update(state, grads, ema_decay_max=config.ema_decay, ema_warmup=config.ema_warmup)
    return state, lax.pmean(metrics, AXIS)


def make_vae_step(vae: Any, config: ml_collections.ConfigDict) -> StepFn:
    """Stage 1: reconstruction + KL loss of ``vae`` (an ``AutoencoderKL``), decoding a posterior sample
    (``config.loss.sample_posterior``) or the posterior mean. Metrics: loss, reconstruction, kl, psnr, grad_norm."""
    loss_cfg = config.loss

    def step(state: TrainState, frozen: dict, batch: Batch, rng: jax.Array) -> tuple[TrainState, Metrics]:
        del frozen  # stage 1 has no frozen component
        images = batch["image"]
        (key,) = example_keys(rng, state.step, images.shape[0], 1)

        def loss_fn(params):
            posterior = vae.apply({"params": params["vae"]}, images, method=vae.encode)
            z = posterior.mean
            if loss_cfg.sample_posterior:
                z = z + posterior.std * _normal(key, z.shape[1:])
            reconstructions = vae.apply({"params": params["vae"]}, z, method=vae.decode)
            return losses.vae_loss(
                images, reconstructions, posterior.kl(), kind=loss_cfg.reconstruction, kl_weight=loss_cfg.kl_weight
            )

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return _finish(state, grads, metrics, config)

    return step


def encode_latents(vae: Any, params: Any, images: jax.Array, noise: jax.Array | None = None) -> jax.Array:
    """Images (B, H, W, 3) in [-1, 1] -> scaled latents (z - shift_factor) * scaling_factor, float32
    (B, h, w, C). z is the posterior mean plus std * ``noise`` (standard normal, (B, h, w, C)) when given."""
    posterior = vae.apply({"params": params}, images, method=vae.encode)
    z = posterior.mean if noise is None else posterior.mean + posterior.std * noise
    if vae.config.shift_factor is not None:
        z = z - vae.config.shift_factor
    return lax.stop_gradient(z * vae.config.scaling_factor)


def latent_shape(vae: Any, image_size: int) -> tuple[int, int, int]:
    """(h, w, C) of the latents of a (image_size, image_size) image."""
    h = image_size // 2 ** (len(vae.config.block_out_channels) - 1)
    return (h, h, vae.config.latent_channels)


def make_diffusion_step(
    unet: Any, text_encoder: Any, vae: Any, schedule_cfg: schedule.ScheduleConfig, config: ml_collections.ConfigDict
) -> StepFn:
    """Stage 2: denoising loss of ``unet`` on latents of the frozen ``vae`` (``frozen["vae"]``), conditioned on
    ``text_encoder`` outputs; the text encoder is trained when its params are in ``state.params``, else read
    from ``frozen["text_encoder"]``. Uniform timesteps; the target (epsilon / v / sample) is the schedule's
    ``prediction_type``; min-SNR-gamma weights (config.loss.snr_gamma) and offset noise (config.loss.noise_offset)
    as options. Metrics: loss, mse, grad_norm."""
    # The noise schedule of training, as diffusers' training scripts read it (DDPMScheduler.from_pretrained).
    alphas_cumprod = schedule.alphas_cumprod(schedule_cfg.for_class("DDPMScheduler"))
    prediction_type, loss_cfg = schedule_cfg.prediction_type, config.loss

    def step(state: TrainState, frozen: dict, batch: Batch, rng: jax.Array) -> tuple[TrainState, Metrics]:
        images, input_ids = batch["image"], batch["input_ids"]
        b = images.shape[0]
        posterior_key, noise_key, offset_key, t_key = example_keys(rng, state.step, b, 4)
        shape = latent_shape(vae, images.shape[1])
        latents = encode_latents(vae, frozen["vae"], images, _normal(posterior_key, shape))
        noise = _normal(noise_key, shape)
        if loss_cfg.noise_offset:
            noise = losses.offset_noise(noise, _normal(offset_key, shape[-1:]), loss_cfg.noise_offset)
        t = jax.vmap(lambda k: jax.random.randint(k, (), 0, schedule_cfg.num_train_timesteps))(t_key)
        noisy = schedule.add_noise(alphas_cumprod, latents, noise, t)
        target = losses.diffusion_target(alphas_cumprod, latents, noise, t, prediction_type)
        weights = losses.min_snr_weights(schedule.snr(alphas_cumprod, t), loss_cfg.snr_gamma, prediction_type)

        def loss_fn(params):
            text_params = params["text_encoder"] if "text_encoder" in params else frozen["text_encoder"]
            context = text_encoder.apply({"params": text_params}, input_ids)
            prediction = unet.apply({"params": params["unet"]}, noisy.astype(unet.dtype), t, context)
            return losses.diffusion_loss(prediction, target, weights)

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return _finish(state, grads, metrics, config)

    return step


def pmap_step(step: StepFn, devices: list[Any] | None = None) -> Callable:
    """``pmap`` of a step over ``devices`` (default: all local devices) with the state donated and the rng
    broadcast. Inputs: replicated state and frozen params, batch with a leading device axis."""
    return jax.pmap(step, axis_name=AXIS, in_axes=(0, 0, 0, None), donate_argnums=(0,), devices=devices)


def replicate(tree: Any, devices: list[Any]) -> Any:
    """One copy of ``tree`` per device, (...) -> (num_devices, ...), laid out as ``pmap_step`` lays out its
    outputs: feeding the step its own outputs then never recompiles it. Each device receives its copy directly;
    no num_devices-fold array is built in host memory."""
    sharding = NamedSharding(Mesh(np.asarray(devices), (AXIS,)), PartitionSpec(AXIS))

    def put(x: Any) -> jax.Array:
        x = np.asarray(x)
        rows = [jax.device_put(x[None], d) for d in devices]
        return jax.make_array_from_single_device_arrays((len(devices), *x.shape), sharding, rows)

    return jax.tree.map(put, tree)


@functools.partial(jax.jit, static_argnums=0)
def _vae_mean(vae: Any, params: Any, images: jax.Array) -> jax.Array:
    return vae.apply({"params": params}, images, method=vae.encode).mean


def latent_std(vae: Any, params: Any, batches: list[jax.Array]) -> float:
    """Standard deviation of the (unscaled, posterior-mean) latents of ``batches`` of images (B, H, W, 3) in
    [-1, 1]: 1 / latent_std is the ``scaling_factor`` that gives the diffusion model unit-variance latents
    (Rombach et al. 2022, Sec. G)."""
    latents = jnp.concatenate([_vae_mean(vae, params, jnp.asarray(x)).reshape(-1) for x in batches])
    return float(jnp.std(latents.astype(jnp.float32)))
