"""Tasks: what a generation does besides text-to-image, as small objects with hooks into the one compiled
denoise function (:func:`sdjax.denoise.denoise`), with no loop of their own.

A task is a frozen, hashable :class:`Task` (its static settings: part of :class:`sdjax.denoise.DenoiseSpec` and
so of the compiled program's key) plus arrays (init image, mask, control images...) that go in the program's
``inputs["tasks"][task.key]`` (leading batch axis B) and parameters in ``params["tasks"][task.key]`` (a
ControlNet's weights): changing an image, a mask or a prompt never recompiles. Each task module has a host-side
``prepare(...) -> Prepared`` that reads and checks the user's arguments and builds those arrays.

Inside the trace a task may implement any of (defaults do nothing), each given a :class:`Run` (spec, params,
scalars, inputs, and ``derived``: what ``derive`` computed)::

  derive(run) -> dict            once, before the loop: arrays computed from its inputs (VAE-encoded init image)
  start(run, noise) -> x | None  the start latents (B, h, w, C) instead of noise (img2img, inpainting); at most
                                 one task of a run gives them
  hooks(run) -> samplers.Hooks   before each model call (``before_model``: concatenate channels to the model
                                 input, give per-example extra inputs) and after each sampler step
                                 (``after_step``: blend latents), seeing the evaluation's noise levels (Row)
  model_inputs(run, call) -> {}  more UNet keyword inputs for one *batched* model call (:class:`ModelCall`:
                                 both guidance branches stacked, each with its own text conditioning), e.g.
                                 ControlNet residuals; ``call.extra`` holds the ``before_model`` extras (row-
                                 dependent numbers such as a ControlNet's scale at this step), never passed to
                                 the UNet themselves

Tasks compose by listing them: inpainting + ControlNet is ``(Inpaint(...), ControlNetTask(...))``; hooks run in
order, channels a task appends come after the latents (``call.x[..., :C]`` are always the latents), and
``model_inputs`` of several tasks must give different keys.
"""

from sdjax.tasks.base import ModelCall, Prepared, Run, Task
from sdjax.tasks.controlnet import ControlNetTask
from sdjax.tasks.img2img import Img2Img
from sdjax.tasks.inpaint import Inpaint

__all__ = ["ControlNetTask", "Img2Img", "Inpaint", "ModelCall", "Prepared", "Run", "Task"]
