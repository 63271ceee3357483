"""Exception types shared by every moesz package.

Every error a user can cause derives from `MoeszError`; its message is one line that names the
input, what is wrong with it and what would be right. The command line prints that line without a
traceback and exits non-zero.
"""

from __future__ import annotations


class MoeszError(Exception):
    """Base class for errors caused by bad input; the message is shown to the user as is."""


class CodecError(MoeszError):
    """A codec cannot encode or decode what it was given (unknown codec, corrupt blob, bad data)."""


class BoundError(MoeszError):
    """An error-bound request is invalid (a level <= 0 or NaN, an unknown mode)."""


class ModelError(MoeszError):
    """A model cannot be loaded or is not a Mixture-of-Experts model."""


class PolicyError(MoeszError):
    """A policy does not fit the model it is applied to or cannot be read."""


class ProfileError(MoeszError):
    """A profile file is missing, corrupt or of another schema version."""


class ConfigError(MoeszError):
    """A serving configuration, budget or other option is invalid."""


class PlanError(MoeszError):
    """A plan cannot be made (infeasible budget) or read."""


class StorageError(MoeszError):
    """A sweep's shared storage (a database, a journal file) stopped answering mid-run."""
