"""One exception type for every user-facing failure.

The CLI prints ``LmforgeError`` messages without a traceback; anything else is a bug.
"""


class LmforgeError(ValueError):
    """Bad input from the user: a malformed config, a wrong checkpoint, a bad recipe, ..."""


class CheckpointError(LmforgeError):
    """A model directory or weight file that cannot be loaded as asked."""


class ConfigError(LmforgeError):
    """A config or recipe field with a missing or invalid value."""
