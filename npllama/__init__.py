"""npllama: a readable NumPy reference implementation of LLaMA-family decoder models.

    import npllama
    model = npllama.load()                    # SmolLM2-135M-Instruct, fetched once into weights/
    ids = model.tokenizer.encode("The capital of France is")
    logits = model([ids])                     # (batch, seq, vocab) float32

Read the spec top to bottom: config -> norm -> rope (-> rope_scaling) -> attention -> mlp ->
cache -> model -> sampling -> generate (docs/reading.md has one line per file). Loaders for
Hugging Face, Meta and GGUF files live in npllama.formats; performance choices in layout.py.
"""

from .config import ModelArgs
from .errors import CheckpointError, ConfigError, InputError, NpllamaError, TokenizerError
from .generate import generate, generate_text
from .model import Transformer
from .sampling import SamplingSettings

__version__ = "0.1.0"


def load(path=None, **kwargs):
    """Load a checkpoint (HF folder, Meta folder or .gguf; default model when None)."""
    from .formats import load as _load
    return _load(path, **kwargs)


__all__ = ["ModelArgs", "Transformer", "SamplingSettings", "generate", "generate_text", "load",
           "NpllamaError", "ConfigError", "CheckpointError", "TokenizerError", "InputError"]
