"""The errors privenc raises for things a user can fix. The command line catches
:class:`PrivencError` (and OSError, whose writers name the file) and prints one line;
anything else is a bug and keeps its traceback."""

from __future__ import annotations


class PrivencError(Exception):
    """Base of every error that is the input's fault, not the code's."""


class ConfigError(PrivencError, ValueError):
    """An invalid configuration value, key, preset or command-line combination."""


class DataError(PrivencError, ValueError):
    """Bad input data, phrased so the user can find it: names the file, line, key or category."""


class CheckpointError(PrivencError, RuntimeError):
    """A checkpoint that cannot be used: missing, truncated, unsafe or of another architecture."""


class TrainingError(PrivencError, RuntimeError):
    """Training cannot go on (a non-finite loss, an unusable run folder)."""


class VerificationError(PrivencError, RuntimeError):
    """Verification cannot give a meaningful number (non-finite encodings or attacker loss)."""


class ExportError(PrivencError, RuntimeError):
    """An exported encoder that does not reproduce the PyTorch encoder."""
