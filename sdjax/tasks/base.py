"""The task interface (see :mod:`sdjax.tasks`): the base class, what its hooks see, what ``prepare`` returns."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax

from sdjax import samplers


class Run(NamedTuple):
    """What a task's traced hooks see: the :class:`sdjax.denoise.DenoiseSpec`, the (compute) params, scalars,
    inputs and, after ``derive``, every task's derived arrays by task key."""

    spec: Any
    params: dict[str, Any]
    scalars: dict[str, Any]
    inputs: dict[str, Any]
    derived: dict[str, Any]

    def arrays(self, task: Task) -> dict[str, Any]:
        """The task's own inputs (``inputs["tasks"][task.key]``)."""
        return self.inputs["tasks"][task.key]

    def task_params(self, task: Task) -> Any:
        return self.params["tasks"][task.key]


class ModelCall(NamedTuple):
    """One batched UNet call: G guidance branches of B examples stacked on the batch axis, in ``branches`` order
    (("uncond", "cond") with classifier-free guidance, else ("cond",)).

    x: (G*B, h, w, C_in) model input (the latents scaled by c_in, then any channels tasks appended); t: float32
    timestep; cond: the UNet's conditioning inputs (G*B, ...) (``encoder_hidden_states``, SDXL's ``text_embeds``
    and ``time_ids``); extra: the tasks' ``before_model`` extras (G*B, ...)."""

    x: jax.Array
    t: jax.Array
    cond: dict[str, jax.Array]
    extra: dict[str, jax.Array]
    branches: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Task:
    """Base of every task: static settings as fields (hashable), every hook a no-op."""

    key: ClassVar[str] = ""

    def derive(self, run: Run) -> dict[str, Any]:
        return {}

    def start(self, run: Run, noise: jax.Array) -> jax.Array | None:
        return None

    def hooks(self, run: Run) -> samplers.Hooks:
        return samplers.Hooks()

    def model_inputs(self, run: Run, call: ModelCall) -> dict[str, Any]:
        return {}


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A task ready to run: its static spec, its per-example arrays (B, ...) and its params (or None); upcast: its
    params are 16-bit and its networks compute in float32 (the CPU's path, :func:`sdjax.platform.compute_module`)."""

    task: Task
    inputs: dict[str, Any]
    params: Any = None
    upcast: bool = False
