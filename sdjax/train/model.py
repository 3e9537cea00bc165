"""A run's networks: rebuilt from its model folder, with the frozen components' params, and its initial params."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from sdjax import checkpoint, loading, parallel, schedule, tokenizer, weights
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


def init_params(module: Any, rng: jax.Array, shardings: Any = None) -> Params:
    """Random float32 params of ``module`` (flax default initialisers), built from ``module.dummy_inputs()``;
    drawn directly into ``shardings`` (a tree of ``NamedSharding``) when given: no device holds more than its
    shards. The values do not depend on the shardings."""
    if shardings is None:
        return jax.jit(module.init)(rng, *module.dummy_inputs())["params"]
    key = np.asarray(jax.random.key_data(rng))
    # Inputs are constants of the program (not arguments): every process runs the same program, whatever its devices.
    init = lambda: module.init(jax.random.wrap_key_data(key), *module.dummy_inputs())["params"]  # noqa: E731
    return jax.jit(init, out_shardings=shardings)()


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


def initial_params(config: ml_collections.ConfigDict, model: Model, rng: jax.Array, shardings: Any = None) -> Params:
    """Step-0 float32 params of the trained components: config.pretrained_path's weights when set, else random;
    a stage with its own ``initial_params`` (LoRA) makes them. Placed on ``shardings`` (the tree of their
    ``NamedSharding``) when given."""
    stage = get_stage(config.stage)
    if hasattr(stage, "initial_params"):
        params = stage.initial_params(config, model, rng)
        return params if shardings is None else parallel.place(params, shardings)
    params = {}
    for i, name in enumerate(get_stage(config.stage).trained(config)):
        module, placement = model.modules[name], None if shardings is None else shardings[name]
        if config.get("pretrained_path"):
            params[name] = weights.load_component(Path(config.pretrained_path) / name)[1]
            params[name] = params[name] if placement is None else parallel.place(params[name], placement)
        else:
            params[name] = init_params(module.clone(dtype=jnp.float32), jax.random.fold_in(rng, i), placement)
    return params


def initial_state(
    config: ml_collections.ConfigDict, model: Model, ckpts: checkpoint.Checkpoints, mesh: Any = None
) -> tuple[state_lib.TrainState, int, jax.Array]:
    """(state, optimizer step, rng): from the latest checkpoint in ``ckpts``, else step 0 of a new run. The state's
    arrays are global arrays on ``mesh`` (default: config.mesh over every device), each with the sharding of
    :mod:`sdjax.parallel`'s rule, restored or created there directly (no full copy on any device)."""
    tx, ema, accum = state_lib.make_optimizer(config), config.ema_decay > 0, config.grad_accum_steps
    mesh = parallel.mesh_from_config(config) if mesh is None else mesh
    create = lambda p: state_lib.create_train_state(p, tx, ema=ema, accumulation_steps=accum)  # noqa: E731
    shapes = jax.eval_shape(create, param_shapes(config, model))
    shardings = parallel.shardings(shapes, mesh, parallel.mesh_options(config)["min_shard_size"])
    rng = jax.random.key(config.seed)
    if ckpts.latest_step() is None:
        params = initial_params(config, model, jax.random.fold_in(rng, 1), shardings.params)
        return jax.jit(create, out_shardings=shardings)(params), 0, rng
    state, start, rng = state_lib.restore_newest(ckpts, parallel.abstract(shapes, shardings))
    logging.info("resumed from %s at step %d", ckpts.directory / str(start), start)
    return state, start, rng
