"""Training: ``train_fold`` wires a plan's network, loss, patch streams and callbacks into the loop."""

from autoseg.training.fold import TrainingOptions, train_fold

__all__ = ["TrainingOptions", "train_fold"]
