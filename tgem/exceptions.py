"""Exceptions and warnings raised by tgem.

Each class also subclasses the built-in (or scikit-learn) class a user would already catch,
so ``except ValueError`` and scikit-learn's own checks keep working.
"""

from __future__ import annotations

from sklearn.exceptions import NotFittedError

__all__ = [
    "DeviceWarning",
    "NotFittedError",
    "TrainingDivergedError",
    "ModelFileError",
    "TrainingInterruptedWarning",
]


class TrainingDivergedError(FloatingPointError):
    """The training loss became NaN or infinite; the model keeps its best weights so far."""


class ModelFileError(ValueError):
    """A model file is unreadable, from an unknown format version, or fails its checksum."""


class DeviceWarning(UserWarning):
    """A model was moved to another device than the one it was fitted on (e.g. CUDA to CPU)."""


class TrainingInterruptedWarning(UserWarning):
    """``fit`` was interrupted (Ctrl-C); the model keeps the best weights found so far."""
