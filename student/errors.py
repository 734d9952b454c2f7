"""Every error stage two raises for bad options or inputs; the CLI shows each as one clear line
(exit code 2) through the base StudentError, and each message names the problem and the fix.
One module, so that a module raising an error imports no other module's machinery for it."""
from __future__ import annotations

from teacher_cache.errors import CacheError


class StudentError(ValueError):
    """Bad options or inputs for train-student / evaluate."""


class DataPlanError(StudentError):
    """The requested epochs / ranks / batch size do not fit the shards or the cache."""


class CheckpointError(StudentError):
    """A checkpoint cannot be read or does not fit the model."""


class TrainingError(StudentError):
    """Training cannot go on (non-finite loss, ...); the message says what to do."""


class ReplayMismatchError(CacheError):
    """A replayed image differs from the one the teacher saw when the cache was computed."""
