"""Reading typed values out of a checkpoint's config (JSON objects, GGUF metadata) with errors that name them.

A config file is input: a value can be missing, of the wrong JSON type, or out of range. Each
reader states what it expects (``Fields(cfg, "config.json").integer("num_hidden_layers")``) and a bad
value becomes one ConfigError that names the file, the key and what was found.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping

from ..checks import is_int, is_number
from ..config import ModelArgs
from ..errors import CheckpointError, ConfigError
from ..io import read_json as io_read_json

_MISSING = object()


def read_json(path: Path, required: bool = True) -> Any:
    """A JSON file's value (npllama.io.read_json: a regular file, bounded in size and nesting);
    None when absent and not required; CheckpointError when unreadable."""
    if not os.path.lexists(path):
        if required:
            raise CheckpointError(f"{path}: missing")
        return None
    return io_read_json(path)


class Fields:
    """Typed access to one config mapping; ``source`` names it in errors ("config.json", "GGUF metadata")."""

    def __init__(self, mapping: Any, source: str):
        if not isinstance(mapping, Mapping):
            raise ConfigError(f"{source}: expected a JSON object, got {type(mapping).__name__}")
        self.mapping, self.source = mapping, source

    def _get(self, key: str, default: Any) -> Any:
        value = self.mapping.get(key)
        if value is None:
            if default is _MISSING:
                raise ConfigError(f"{self.source}: required key {key!r} is missing")
            return default
        return value

    def _bad(self, key: str, what: str) -> ConfigError:
        return ConfigError(f"{self.source}: {key!r} must be {what}, got {self.mapping.get(key)!r:.80}")

    def integer(self, key: str, default: Any = _MISSING, minimum: int | None = 1) -> Any:
        """An integer (a float with an integral value is accepted, as JSON writers produce 4096.0)."""
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if not is_number(value) or not math.isfinite(value) or value != int(value):
            raise self._bad(key, "an integer")
        value = int(value)
        if minimum is not None and value < minimum:
            raise self._bad(key, f"an integer >= {minimum}")
        return value

    def number(self, key: str, default: Any = _MISSING, positive: bool = True) -> Any:
        """A finite number (positive unless told otherwise)."""
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if not is_number(value) or not math.isfinite(value) or (positive and value <= 0):
            raise self._bad(key, "a positive finite number" if positive else "a finite number")
        return float(value)

    def flag(self, key: str, default: Any = _MISSING) -> Any:
        """true or false: a string such as "false" is refused rather than read as true."""
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise self._bad(key, "true or false")
        return value

    def token_ids(self, key: str) -> tuple[int, ...]:
        """One token id or a list of them (eos_token_id may be either); missing gives ()."""
        value = self.mapping.get(key)
        if value is None:
            return ()
        values = value if isinstance(value, (list, tuple)) else [value]
        if not all(is_int(v) and v >= 0 for v in values):
            raise self._bad(key, "a token id or a list of token ids")
        return tuple(values)

    def mapping_or_none(self, key: str) -> Mapping | None:
        value = self.mapping.get(key)
        if value is not None and not isinstance(value, Mapping):
            raise self._bad(key, "an object or null")
        return value


def build_args(make: Callable[..., ModelArgs], where: Any, *args: Any, **kwargs: Any) -> ModelArgs:
    """Call a ModelArgs constructor; any complaint becomes a ConfigError that names the file ``where``."""
    try:
        return make(*args, **kwargs)
    except ConfigError as e:
        message = str(e)
        raise ConfigError(message if message.startswith(str(where)) else f"{where}: {message}") from None
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as e:   # a value of the wrong type
        raise ConfigError(f"{where}: malformed value ({type(e).__name__}: {e})") from None


def normalise_rope_scaling(scaling: Any, source: str) -> dict[str, Any]:
    """Give every rope_scaling dict a 'rope_type' (older configs call it 'type')."""
    if not isinstance(scaling, Mapping):
        raise ConfigError(f"{source}: rope_scaling must be an object or null")
    scaling = dict(scaling)
    kind = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    if not isinstance(kind, str):
        raise ConfigError(f"{source}: rope_scaling's rope_type must be a string, got {kind!r:.80}")
    return {"rope_type": kind, **scaling}
