"""The one family of user-facing errors.

Every error a user can fix derives from `UserError`: its message is one line that says what was
wrong and what would be valid. The CLI and the dashboard catch `UserError` (and nothing broader) and
show the message without a stack trace. Torch-free: the dashboard imports it.
"""

from __future__ import annotations


class UserError(Exception):
    """An error caused by the user's input or environment; shown as a one-line message."""


class DataError(UserError, ValueError):
    """Bad data input; the message says what was wrong and what would be valid."""


class ModelLoadError(UserError, RuntimeError):
    """A model spec could not be resolved or loaded; the message says what would be valid."""


class UnsupportedArchitecture(UserError, ValueError):
    """The model's `model_type` has no adapter."""


class PlanError(UserError, ValueError):
    """Bad targets, plan or scores for pruning; the message says what would be valid."""


class ScoreError(UserError, ValueError):
    """Bad scoring input or an unusable scores file; the message says what would be valid."""


class RunError(UserError, RuntimeError):
    """A run folder or job problem the user can fix."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read or verified."""


class ResourceError(UserError, RuntimeError):
    """Not enough memory or disk for what was asked; the message names sizes that would fit."""


class Cancelled(Exception):
    """Raised inside a worker when a cancel request or SIGTERM arrived (after a clean stop)."""
