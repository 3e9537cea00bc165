"""A run's networks: rebuilt from its model folder, with the frozen components' params, and its initial params."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from sdjax import checkpoint, loading, schedule, tokenizer, weights
from sdjax.loading import folders
from sdjax.train import state as state_lib
from sdjax.train.checks import TrainConfigError
from sdjax.train.stage import get_stage

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
Params = dict[str, Any]


def compute_dtype(config: ml_collections.ConfigDict) -> Any:
    """The compute dtype named by ``config.dtype`` (params stay float32 either way)."""
    if config.dtype not in DTYPES:
        raise TrainConfigError(f"unknown dtype {config.dtype!r}; accepted: {', '.join(DTYPES)}")
    return DTYPES[config.dtype]


def init_params(module: Any, rng: jax.Array) -> Params:
    """Random float32 params of ``module`` (flax default initialisers), built from ``module.dummy_inputs()``."""
    return jax.jit(module.init)(rng, *module.dummy_inputs())["params"]


@dataclasses.dataclass
class Model:
    """Modules (name -> flax module in the compute dtype) and frozen params (name -> params) of a run; its
    family ("sd" or "sdxl": see :mod:`sdjax.train.families`), tokenizers (SDXL's second in ``tokenizer_2``)
    and the model_index options of the family (SDXL: force_zeros_for_empty_prompt, requires_aesthetics_score)."""

    modules: dict[str, Any]
    frozen: Params
    tokenizer: Any = None
    schedule: schedule.ScheduleConfig | None = None
    scheduler_class: str = "DDIMScheduler"
    family: str = "sd"
    tokenizer_2: Any = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


def load_model(config: ml_collections.ConfigDict, folder: Path) -> Model:
    """Rebuilds the run's modules from ``folder`` (workdir/model); frozen components come with their params."""
    dtype, trained = compute_dtype(config), get_stage(config.stage).trained(config)
    index = json.loads((folder / "model_index.json").read_text())
    if index.get("_class_name") == "AutoencoderKL":  # a stage-1 run: the VAE alone
        names, layout, dtypes = ["vae"], folders.SD, {}
    else:
        layout = folders.layout_of(index, folder)
        names, dtypes = folders.present_networks(index, layout), loading.network_dtypes(folder, layout, dtype)
    modules, frozen = {}, {}
    for name in names:
        if name in trained:
            modules[name] = weights.build_component(folder / name, dtypes.get(name, dtype))
        else:
            modules[name], frozen[name] = weights.load_component(folder / name, dtypes.get(name, dtype))
    if "unet" in modules and config.remat:
        modules["unet"] = modules["unet"].clone(remat=True)
    if "scheduler" not in index:
        return Model(modules, frozen)
    return Model(
        modules,
        frozen,
        tokenizer=tokenizer.load_tokenizer(folder / "tokenizer"),
        schedule=schedule.ScheduleConfig.from_json_file(folder / "scheduler" / "scheduler_config.json"),
        scheduler_class=index["scheduler"][1],
        family=layout.family,
        tokenizer_2=tokenizer.load_tokenizer(folder / "tokenizer_2") if "tokenizer_2" in index else None,
        options={key: index.get(key, default) for key, default in layout.options.items()},
    )


def param_shapes(config: ml_collections.ConfigDict, model: Model) -> Params:
    """``jax.ShapeDtypeStruct`` trees of the trained components' float32 params (no init, no loading)."""
    stage = get_stage(config.stage)
    if hasattr(stage, "initial_params"):  # trained params that are not networks (LoRA factors): traced, not drawn
        return jax.eval_shape(lambda rng: stage.initial_params(config, model, rng), jax.random.key(0))
    return {
        name: weights.param_shapes(model.modules[name].clone(dtype=jnp.float32))
        for name in get_stage(config.stage).trained(config)
    }


def initial_params(config: ml_collections.ConfigDict, model: Model, rng: jax.Array) -> Params:
    """Step-0 float32 params of the trained components: config.pretrained_path's weights when set, else random;
    a stage with its own ``initial_params`` (LoRA) makes them."""
    stage = get_stage(config.stage)
    if hasattr(stage, "initial_params"):
        return stage.initial_params(config, model, rng)
    params = {}
    for i, name in enumerate(get_stage(config.stage).trained(config)):
        module = model.modules[name]
        if config.get("pretrained_path"):
            params[name] = weights.load_component(Path(config.pretrained_path) / name)[1]
        else:
            params[name] = init_params(module.clone(dtype=jnp.float32), jax.random.fold_in(rng, i))
    return params


def initial_state(
    config: ml_collections.ConfigDict, model: Model, ckpts: checkpoint.Checkpoints
) -> tuple[state_lib.TrainState, int, jax.Array]:
    """(host state, optimizer step, rng): from the latest checkpoint in ``ckpts``, else step 0 of a new run."""
    tx, ema, accum = state_lib.make_optimizer(config), config.ema_decay > 0, config.grad_accum_steps
    rng = jax.random.key(config.seed)
    if ckpts.latest_step() is None:
        params = initial_params(config, model, jax.random.fold_in(rng, 1))
        return state_lib.create_train_state(params, tx, ema=ema, accumulation_steps=accum), 0, rng
    create = lambda p: state_lib.create_train_state(p, tx, ema=ema, accumulation_steps=accum)
    state, start, rng = state_lib.restore_checkpoint(ckpts, jax.eval_shape(create, param_shapes(config, model)))
    logging.info("resumed from %s at step %d", ckpts.directory / str(start), start)
    return state, start, rng
