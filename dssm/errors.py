"""Exception types. Every user-facing failure is one of these, with the offending value in the message."""

from __future__ import annotations

__all__ = [
    "DSSMError",
    "InputError",
    "ConfigError",
    "ChecksumError",
    "IndexNotFoundError",
]


class DSSMError(Exception):
    """Base class: the CLI prints these as ``error: <message>`` and exits 2, without a traceback."""


class InputError(DSSMError, ValueError):
    """User input is unusable: a missing file, wrong columns, an empty corpus, a bad record."""


class ConfigError(DSSMError, ValueError):
    """A configuration value is out of range or inconsistent with an artifact."""


class ChecksumError(DSSMError):
    """An artifact file does not match the sha256 recorded in its manifest (corrupted or truncated)."""


class IndexNotFoundError(DSSMError, FileNotFoundError):
    """No loadable index (or model) at the given path."""
