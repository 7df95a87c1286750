"""kinship's error contract: every error a user can fix is a :class:`KinshipError`.

The command line prints it as ``kinship: error: <message>`` and exits with status 2; the message
names what is wrong (the key, the file, the step) and what to do. Anything else escaping is a bug.
"""

from __future__ import annotations


class KinshipError(Exception):
    """An error in the user's input or environment, reported without a traceback."""


class ConfigError(KinshipError, ValueError):
    """A configuration key or value that cannot be used."""


class DataError(KinshipError, RuntimeError):
    """Missing, unreadable or inconsistent data; the message names the file or index."""


class CheckpointError(KinshipError, ValueError):
    """A file that is not a kinship checkpoint, one that is truncated, or one that does not fit."""


class NonFiniteLossError(KinshipError, RuntimeError):
    """A loss became NaN or infinite; the message names the step and what was kept."""


class WriteError(KinshipError, OSError):
    """A file could not be written (a full disk, a missing permission); the previous file is kept."""
