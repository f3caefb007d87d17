"""Generation: budgets, stop tokens, repeatability, errors, and text streaming."""

import numpy as np
import pytest

from npllama.config import ModelArgs
from npllama.errors import InputError
from npllama.generate import generate, stream_text
from npllama.model import Transformer
from npllama.params import init_params
from npllama.sampling import SamplingSettings

ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, hidden_dim=40, max_seq_len=32,
                 eos_token_ids=(0,))


@pytest.fixture(scope="module")
def model():
    return Transformer(ARGS, init_params(ARGS, seed=5, std=0.5))


def test_generation_equals_argmax_of_full_recompute(model):
    ids = [3, 4, 5]
    out = list(generate(model, ids, 8, stop_ids=()))
    seq = list(ids)
    for _ in range(8):
        seq.append(int(np.argmax(model([seq])[0, -1])))
    assert out == seq[3:]


def test_seed_repeats_and_differs(model):
    s = SamplingSettings(temperature=1.5)
    a = list(generate(model, [1, 2], 10, s, seed=1, stop_ids=()))
    assert a == list(generate(model, [1, 2], 10, s, seed=1, stop_ids=()))
    assert a != list(generate(model, [1, 2], 10, s, seed=2, stop_ids=()))


def test_stops_on_stop_token(model):
    first = list(generate(model, [3, 4, 5], 1, stop_ids=()))[0]
    assert list(generate(model, [3, 4, 5], 10, stop_ids={first})) == [first]


def test_window_limits_new_tokens_and_long_prompt_is_refused(model):
    assert len(list(generate(model, [1] * 30, 10, stop_ids=()))) == 3
    with pytest.raises(InputError, match="prompt is 40 tokens, longer than the context window of 32"):
        list(generate(model, [1] * 40, 5))
    with pytest.raises(InputError, match="empty"):
        list(generate(model, [], 5))
    with pytest.raises(InputError, match="max_new_tokens"):
        list(generate(model, [1], -1))


class Bytes:
    """A byte-level toy tokenizer: id = byte value."""
    def decode(self, ids, skip_special=False):
        return bytes(ids).decode("utf-8", errors="replace")


def test_stream_text_holds_back_split_characters():
    text = "héllo → wörld"
    ids = list(text.encode())
    pieces = list(stream_text(Bytes(), ids))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
