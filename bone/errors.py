"""Errors raised by the ``bone`` package.

``BoneError`` subclasses ``ValueError`` so callers that already catch PEFT's ``ValueError`` keep working.
"""


class BoneError(ValueError):
    """Base class of every error this package raises on purpose."""


class BoneConfigError(BoneError):
    """A ``BoneConfig`` field is invalid, or the config does not fit the model (no targets, bad shapes)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field  # the offending BoneConfig field, so the service can report `param`


class BoneCheckpointError(BoneError):
    """An adapter checkpoint is missing, malformed, or does not match the model (names, shapes, format)."""
