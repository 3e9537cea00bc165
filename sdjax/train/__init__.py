"""Training: stages (what a run trains: vae_stage, diffusion_stage), train state and optimizer (state), objectives
(losses), update and evaluation steps (steps), the run's networks (model), checks before a run (checks), watching
it (monitor), and the loop that ties them together (loop). Entry point: ``train.py``."""

from sdjax.train.checks import TrainConfigError
from sdjax.train.loop import train_and_evaluate
from sdjax.train.monitor import NonFiniteLossError
from sdjax.train.state import TrainState, create_train_state, make_optimizer

__all__ = ["NonFiniteLossError", "TrainConfigError", "TrainState", "create_train_state", "make_optimizer",
           "train_and_evaluate"]  # fmt: skip
