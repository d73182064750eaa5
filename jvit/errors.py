"""Exceptions shared by every layer of jvit (data, models, conversion, training).

They live at the bottom of the import graph so that lower layers (``jvit.data``) can raise them
without importing the trainer.
"""


class ConfigError(ValueError):
    """A config (or what it points at) that cannot run; the message names the field."""


class CorruptImageError(ValueError):
    """An example whose image cannot be read or decoded; the message names the file."""
