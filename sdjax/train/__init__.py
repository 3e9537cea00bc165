"""Training: train state and optimizer (state), objectives (losses), pmapped update steps (steps), and the loop
that ties them to data, checkpoints and logging (loop). Entry point: ``train.py``."""

from sdjax.train.loop import NonFiniteLossError, TrainConfigError, train_and_evaluate
from sdjax.train.state import TrainState, create_train_state, make_optimizer

__all__ = ["NonFiniteLossError", "TrainConfigError", "TrainState", "create_train_state", "make_optimizer",
           "train_and_evaluate"]  # fmt: skip
