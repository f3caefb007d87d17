"""One family of errors for everything npllama refuses.

Every message names the thing that is wrong (a file, a tensor, a parameter) and says what to do.
The command line prints the message of an ``NpllamaError`` and exits non-zero, never a traceback.
"""

from __future__ import annotations


class NpllamaError(Exception):
    """Base class: bad input that npllama detected and explained."""


class ConfigError(NpllamaError, ValueError):
    """A model configuration is missing a key or holds an impossible value."""


class CheckpointError(NpllamaError, ValueError):
    """A checkpoint file is missing, truncated, corrupted, hostile, or does not fit its config."""


class TokenizerError(NpllamaError, ValueError):
    """A tokenizer file cannot be read, or token ids fall outside the vocabulary."""


class InputError(NpllamaError, ValueError):
    """A prompt, token array or setting given at run time is out of range."""


class OutputError(NpllamaError, OSError):
    """An output file or folder cannot be written (no permission, a path under a file, a full disk)."""
