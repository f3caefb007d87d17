"""One family of errors for everything npllama refuses.

Every message names the thing that is wrong (a file, a tensor, a parameter) and says what to do.
The command line prints the message of an ``NpllamaError`` and exits non-zero, never a traceback.
"""

from __future__ import annotations

import re

# Characters that act on a terminal instead of showing: C0 and C1 controls (escape sequences move the
# cursor, clear the screen, set the title), DEL, the bidirectional overrides and isolates that
# reorder a line, the line and paragraph separators, and lone surrogates (bytes that were not UTF-8).
_ACTING = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def printable(text: str) -> str:
    """``text`` with every character that would act on a terminal written as its escape (ESC as
    ``\\x1b``, U+202E as ``\\u202e``): what a message quotes from a file (a tensor or member name,
    a key) is shown, never obeyed. The command line passes every error message through it."""
    return _ACTING.sub(lambda m: m.group().encode("unicode_escape", "backslashreplace").decode("ascii"), text)


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
