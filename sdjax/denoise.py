"""The one compiled denoising function: guided model, start latents, sampler scan, decode; tasks hook into it.

``denoise(spec, params, scalars, inputs)`` is pure: everything static about a run is in the hashable
:class:`DenoiseSpec` (networks, sampler plan, which branches run, the tasks' static settings), everything else is
an array. Per-example inputs (leading batch axis B):

  noise    float32 (B, h, w, C)   standard-normal initial noise
  keys     uint32 key data (B, ...)   image i's PRNG key (see :func:`image_keys`)
  cond     dict of UNet keyword inputs, each (B, ...): {"encoder_hidden_states": (B, 77, D)} (SDXL adds
           text_embeds and time_ids; an LCM-distilled UNet timestep_cond)
  uncond   the same for the negative prompt (guided runs only)
  tasks    {task.key: that task's arrays} (:mod:`sdjax.tasks`: img2img's init image, inpainting's mask...)

params: {"unet", "vae", "tasks": {task.key: ...}}; scalars ``{"guidance": f32, "eta": f32, "guidance_rescale":
f32}`` shared by the batch. A task (img2img, inpainting, ControlNet) lands in :mod:`sdjax.tasks` and takes part
through its hooks (derive, start, before_model / after_step, model_inputs), never through a flag here.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdjax import latents, samplers
from sdjax.tasks.base import ModelCall, Run

TRACE_COUNT = 0  # how many times the denoising function was traced (compiled); tests read it

# Image i's random streams all derive from fold_in(key(seed), i), each under its own tag, so that the initial
# noise, the posterior samples of init images (sdjax.tasks.img2img: 1, and 3 for inpainting's masked image) and the
# sampler's per-step noise are independent of one another.
INITIAL_NOISE, POSTERIOR, SAMPLER = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class DenoiseSpec:
    """What is static about a denoising run; with the input shapes and devices, the key of its compiled program.

    unet, vae: flax modules (hashable); plan: the sampler plan; guided: classifier-free guidance (two branches
    per evaluation); tasks: the run's :class:`sdjax.tasks.Task` s, in hook order; rescale: apply
    ``guidance_rescale`` (Lin et al. 2023, arXiv:2305.08891, Sec. 3.4); decode: False returns the final latents,
    not images; upcast_params: cast the (16-bit) params to float32 once, before the loop, for float32 networks
    (the CPU's fast path)."""

    unet: Any
    vae: Any
    plan: samplers.SamplerPlan
    guided: bool
    tasks: tuple = ()
    rescale: bool = False
    decode: bool = True
    upcast_params: bool = False


def image_keys(seed: int, n: int) -> jax.Array:
    """(n,) PRNG keys, key i = fold_in(key(seed), i): image i's randomness whatever the batch split."""
    return jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(n))


def initial_noise(keys: jax.Array, shape: tuple[int, int, int]) -> jax.Array:
    """Standard-normal initial noise (n, *shape) float32, image i's from its key ``keys[i]``."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, INITIAL_NOISE), shape))(keys)


def _tagged(keys: jax.Array, tag: int) -> jax.Array:
    return jax.vmap(lambda k: jax.random.fold_in(k, tag))(keys)


def rescale_guidance(guided: jax.Array, cond: jax.Array, guidance_rescale: jax.Array) -> jax.Array:
    """Rescaled classifier-free guidance (Lin et al. 2023, arXiv:2305.08891, Sec. 3.4), as diffusers'
    ``rescale_noise_cfg``: the guided output scaled to the conditional output's per-example std, mixed with the
    unscaled one by ``guidance_rescale`` in [0, 1]. guided, cond: (B, h, w, C) float32."""
    axes = tuple(range(1, guided.ndim))
    std_cond = jnp.std(cond, axis=axes, keepdims=True, ddof=1)  # torch.std is the unbiased estimate
    std_guided = jnp.std(guided, axis=axes, keepdims=True, ddof=1)
    return guidance_rescale * (guided * (std_cond / std_guided)) + (1 - guidance_rescale) * guided


def guidance_scale_embedding(w: jax.Array, embedding_dim: int) -> jax.Array:
    """An LCM-distilled UNet's ``timestep_cond``: the guidance weight w (B,) (= guidance_scale - 1) as a
    sinusoidal embedding (B, embedding_dim) float32, as diffusers' ``LatentConsistencyModelPipeline.
    get_guidance_scale_embedding`` (VDM, Kingma et al. 2021): sin then cos of 1000 w times frequencies
    10000^(-k / (embedding_dim / 2 - 1))."""
    half = embedding_dim // 2
    freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(jnp.log(10000.0) / (half - 1)))
    emb = (jnp.asarray(w, jnp.float32) * 1000.0)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=1)
    return jnp.pad(emb, ((0, 0), (0, embedding_dim % 2)))


def guided_model(run: Run) -> samplers.ModelFn:
    """The sampler's model: (x (B, h, w, C_in) float32, t, **extra) -> float32 UNet output, with classifier-free
    guidance uncond + guidance * (cond - uncond) when ``spec.guided`` (one UNet call on the 2B batch), rescaled by
    ``scalars["guidance_rescale"]`` when ``spec.rescale``. ``extra``: the tasks' ``before_model`` extras (B, ...),
    which the tasks' ``model_inputs`` read (:class:`sdjax.tasks.ModelCall`); the UNet gets the conditioning and
    what ``model_inputs`` give."""
    spec, params, inputs, scalars = run.spec, run.params, run.inputs, run.scalars
    unet, guidance = spec.unet, scalars["guidance"]
    branches = ("uncond", "cond") if spec.guided else ("cond",)

    def stack(*trees):
        return jax.tree.map(lambda *a: jnp.concatenate(a) if len(a) > 1 else a[0], *trees)

    def model_fn(x, t, **extra):
        call = ModelCall(stack(*[x] * len(branches)), t, stack(*(inputs[b] for b in branches)),
                         stack(*[extra] * len(branches)), branches)  # fmt: skip
        unet_inputs = dict(call.cond)
        for task in spec.tasks:
            unet_inputs |= task.model_inputs(run, call)
        out = unet.apply({"params": params["unet"]}, call.x.astype(unet.dtype), t, **unet_inputs)
        out = out.astype(jnp.float32)
        if not spec.guided:
            return out
        out_uncond, out_cond = jnp.split(out, 2)
        guided = out_uncond + guidance * (out_cond - out_uncond)
        return rescale_guidance(guided, out_cond, scalars["guidance_rescale"]) if spec.rescale else guided

    return model_fn


def denoise(spec: DenoiseSpec, params: Any, scalars: dict, inputs: dict, hooks: tuple = ()) -> jax.Array:
    """The whole run: the tasks' derived arrays and start latents, ``spec.plan`` as one ``lax.scan`` over the
    guided model, VAE decode.

    params, scalars, inputs: as the module docstring; hooks: more sampling hooks (:class:`sdjax.samplers.Hooks`)
    after the tasks'. Returns float32 images (B, H, W, 3) in [0, 1], or, when ``spec.decode`` is False, the final
    float32 latents (B, h, w, C). :class:`SteppedDenoise` runs the same parts as separate programs.
    """
    global TRACE_COUNT
    TRACE_COUNT += 1  # Python side effect: runs once per trace, never at run time (tested)
    params = compute_params(spec, params)
    carry, derived = start(spec, params, scalars, inputs)
    rows = samplers.plan_rows(spec.plan)
    return finish(spec, params, steps(spec, params, scalars, inputs, derived, carry, rows, hooks))


def compute_params(spec: DenoiseSpec, params: Any) -> Any:
    """The params the networks run with: cast to float32 once per run with ``spec.upcast_params`` (inside the
    scan it would convert every parameter at every step)."""
    return jax.tree.map(lambda a: a.astype(jnp.float32), params) if spec.upcast_params else params


def start(spec: DenoiseSpec, params: Any, scalars: dict, inputs: dict) -> tuple[tuple, dict]:
    """(the sampler loop's carry before its first evaluation: (start latents, sampler state), the tasks' derived
    arrays). The start latents are the scaled noise unless a task gives them (img2img, inpainting)."""
    run = Run(spec, params, scalars, inputs, {})
    derived = {task.key: task.derive(run) for task in spec.tasks}
    run = run._replace(derived=derived)
    noise = inputs["noise"].astype(jnp.float32)
    starts = [x for x in (task.start(run, noise) for task in spec.tasks) if x is not None]
    if len(starts) > 1:
        raise ValueError(f"more than one task of {[t.key for t in spec.tasks]} gives the start latents")
    x = starts[0] if starts else samplers.initial_latents(spec.plan, noise)
    return samplers.initial_carry(spec.plan, x), derived


def steps(
    spec: DenoiseSpec,
    params: Any,
    scalars: dict,
    inputs: dict,
    derived: dict,
    carry: tuple,
    rows: Any,
    hooks: tuple = (),
) -> tuple:
    """The sampler evaluations ``rows`` (:func:`sdjax.samplers.plan_rows` or a slice) on the guided model, with
    the tasks' hooks then ``hooks``."""
    run = Run(spec, params, scalars, inputs, derived)
    all_hooks = (*(task.hooks(run) for task in spec.tasks), *hooks)
    keys = _tagged(jax.random.wrap_key_data(inputs["keys"]), SAMPLER)
    return samplers.sample_steps(spec.plan, guided_model(run), carry, rows, keys, eta=scalars["eta"], hooks=all_hooks)


def finish(spec: DenoiseSpec, params: Any, carry: tuple) -> jax.Array:
    """The final latents decoded to images (or returned as they are when ``spec.decode`` is False)."""
    return latents.decode(spec.vae, params["vae"], carry[0]) if spec.decode else carry[0]


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


def compiled_denoise(spec: DenoiseSpec, num_devices: int) -> Any:
    """``denoise`` jitted on one device, or pmapped over ``num_devices`` (params replicated, scalars shared,
    inputs with a leading device axis)."""

    def fn(params, scalars, inputs):
        return denoise(spec, params, scalars, inputs)

    return _per_device(fn, num_devices, (0, None, 0))


def _per_device(fn: Any, num_devices: int, in_axes: tuple) -> Any:
    return jax.pmap(fn, in_axes=in_axes) if num_devices > 1 else jax.jit(fn)


class SteppedDenoise:
    """``denoise`` as separately compiled programs (cast the params, start, one sampler evaluation, finish) that a
    host loop runs with a progress bar over the evaluations. A program holding a host callback (the other way to
    report progress) is never written to JAX's persistent compilation cache; these are, so ``--progress`` compiles
    once per shape like a run without it. Each step runs the scan body of ``denoise`` on one row of the plan."""

    def __init__(self, spec: DenoiseSpec, num_devices: int):
        self.spec, self.num_devices = spec, num_devices
        self.programs = {
            "start": _per_device(functools.partial(start, spec), num_devices, (0, None, 0)),
            "step": _per_device(functools.partial(steps, spec), num_devices, (0, None, 0, 0, 0, None)),
            "finish": _per_device(functools.partial(finish, spec), num_devices, (0, 0)),
        }
        if spec.upcast_params:
            self.programs["upcast"] = _per_device(functools.partial(compute_params, spec), num_devices, (0,))

    def compile(self, params: Any, scalars: dict, inputs: dict, compile_fn: Any) -> Any:
        """Compiles every program with ``compile_fn(name, jitted, args)`` (argument shapes from ``jax.eval_shape``,
        nothing runs) and returns ``run(params, scalars, inputs)``, which runs them like ``denoise``."""
        compiled = {}
        if "upcast" in self.programs:
            compiled["upcast"] = compile_fn("upcast", self.programs["upcast"], (params,))
            params = jax.eval_shape(self.programs["upcast"], params)
        compiled["start"] = compile_fn("start", self.programs["start"], (params, scalars, inputs))
        carry, derived = jax.eval_shape(self.programs["start"], params, scalars, inputs)
        row = jax.tree.map(lambda r: r[:1], samplers.plan_rows(self.spec.plan))
        step_args = (params, scalars, inputs, derived, carry, row)
        compiled["step"] = compile_fn("step", self.programs["step"], step_args)
        compiled["finish"] = compile_fn("finish", self.programs["finish"], (params, carry))
        return functools.partial(self._run, compiled)

    def _run(self, compiled: dict, params: Any, scalars: dict, inputs: dict) -> jax.Array:
        from tqdm.auto import tqdm

        if "upcast" in compiled:
            params = compiled["upcast"](params)
        carry, derived = compiled["start"](params, scalars, inputs)
        rows = jax.tree.map(np.asarray, samplers.plan_rows(self.spec.plan))
        total = self.spec.plan.num_evaluations
        with tqdm(total=total, desc="sampling", leave=False) as bar:
            for i in range(total):
                row = jax.tree.map(lambda values: values[i : i + 1], rows)  # noqa: B023 - used at once
                carry = compiled["step"](params, scalars, inputs, derived, carry, row)
                jax.block_until_ready(carry)  # the bar follows finished evaluations, not queued ones
                bar.update(1)
        return compiled["finish"](params, carry)
