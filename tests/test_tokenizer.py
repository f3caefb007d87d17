"""Tokenizers: npllama's ids equal the reference libraries' ids; decoding and streaming are exact."""


import copy
import unicodedata

import pytest
import sentencepiece as spm
from hypothesis import HealthCheck, given, settings, strategies as st

from npllama.errors import TokenizerError
from npllama.formats.gguf import read_metadata
from npllama.formats.gguf_reader import open_gguf
from npllama.formats.gguf_vocab import gguf_tokenizer
from npllama.formats.gguf_vocab import tokenizer_from_vocab
from npllama.tokenizer import StreamDecoder, Tokenizer
from npllama.weights import default_model_path
from tiny import gguf_vocab_from_sentencepiece, sample_text, train_bpe, train_sentencepiece

VARIED = [
    "Hello world", "Hello world 12345", " 1 22 333 a1b2 3.14159 $100,000 1e-5", "", " ", "  leading", "trailing   ",
    "héllo  wörld\n\n  x", "日本語 😀 🇫🇷 👩‍👩‍👧", "I'm can't we'll THEY'RE", "\t\ttabs\r\nCRLF\n\n\n",
    "def f(x):\n    return x**2  # comment\n", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<repo_name>x<file_sep>y<|endoftext|>", "<|im_start", "im_end|>", "<|im_end|><|im_end|>", "a<|im_end|>b",
    "Ġ Ċ ĉ", "\u00a0nbsp\u2003em", "\x00\x01 control", "ÿ€𝄞", "ﬁ ligature", "Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǫ̗",
]


# ----------------------------------------------------------------------------------- default GGUF
@pytest.fixture(scope="module")
def smol():
    path = default_model_path()
    return gguf_tokenizer(read_metadata(open_gguf(path), path), path)


@pytest.fixture(scope="module")
def smol_hf():
    """transformers' tokenizer for the default GGUF, as shipped, and with the file's pre-tokenizer.

    The file says tokenizer.ggml.pre = "smollm": llama.cpp splits with "\\p{N}" (each digit alone)
    and then GPT-2's regex, as SmolLM2's own tokenizer.json does (Digits + ByteLevel).
    transformers 5 has no entry for "smollm" and falls back to GPT-2's regex alone. The two agree
    except where whitespace precedes a number: "\\n 0" is ["\\n ", "0"] for the file, ["\\n", " 0"]
    for GPT-2's regex; " ¼" is [" ", "¼"] vs [" ¼"]. npllama follows the file.
    """
    transformers = pytest.importorskip("transformers")
    from tokenizers import pre_tokenizers as pt

    path = default_model_path()
    stock = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    smollm = copy.deepcopy(stock)
    smollm.backend_tokenizer.pre_tokenizer = pt.Sequence(
        [pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False, use_regex=True)])
    return stock, smollm


def _gpt2_regex_differs(text: str) -> bool:
    """Where splitting digits first can change the ids: whitespace right before a numeric character
    (Unicode N*), except one space before an ASCII digit ("Ġ" never merges with a digit in SmolLM)."""
    for i, c in enumerate(text):
        if i and unicodedata.category(c).startswith("N") and text[i - 1].isspace():
            if not (c.isascii() and text[i - 1] == " " and (i < 2 or not text[i - 2].isspace())):
                return True
    return False


def _check_against_transformers(smol, smol_hf, text):
    stock, smollm = smol_hf
    ids = smol.encode(text)
    assert ids == smollm.encode(text)
    if not _gpt2_regex_differs(text):
        assert ids == stock.encode(text)
    assert smol.decode(ids) == stock.decode(ids)


@pytest.mark.parametrize("text", VARIED + ["\n 0", "x  12", "\n\n 5 6"])
def test_default_gguf_ids_equal_transformers(smol, smol_hf, text):
    _check_against_transformers(smol, smol_hf, text)


@settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.text(max_size=30), st.sampled_from(["<|im_start|>", "<|im_end|>", "<|endoftext|>",
                                                                  " 12", "\n", "  ", "'s"])), max_size=5))
def test_default_gguf_ids_equal_transformers_on_any_text(smol, smol_hf, parts):
    _check_against_transformers(smol, smol_hf, "".join(parts))


def test_smollm_pre_tokenizer_splits_digits_like_llama_cpp(smol):
    # llama.cpp's "smollm" regexes: "\\p{N}" first, so a whitespace run before a digit stays whole.
    assert [smol.id_to_token(i) for i in smol.encode("\n 0")] == ["ĊĠ", "0"]
    assert [smol.id_to_token(i) for i in smol.encode("year 2024")] == ["year", "Ġ", "2", "0", "2", "4"]


def test_default_gguf_special_tokens_by_id(smol):
    assert smol.vocab_size == 49152
    assert (smol.bos_id, smol.eos_ids) == (1, (2,))
    assert smol.encode("<|im_start|>") == [1] and smol.token_to_id("<|im_end|>") == 2
    assert smol.id_to_token(2) == "<|im_end|>"
    assert smol.add_bos is False
    assert smol.chat_template and "<|im_start|>" in smol.chat_template
    ids = smol.encode("<|im_start|>user\nhi<|im_end|>")
    assert smol.decode(ids, skip_special=True) == "user\nhi"
    # The text "<|im_end|>" inside ordinary words is still one special id; stripping is never used.
    assert smol.decode([2, 2]) == "<|im_end|><|im_end|>"


def test_decode_refuses_ids_outside_the_vocabulary(smol):
    for bad in ([49152], [-1], [1.5], ["3"]):
        with pytest.raises(TokenizerError):
            smol.decode(bad)
    with pytest.raises(TokenizerError):
        smol.id_to_token(10 ** 6)
    with pytest.raises(TokenizerError):
        smol.encode(b"bytes")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------- streaming
def _stream(tok, ids, skip_special=False):
    stream = StreamDecoder(tok, skip_special=skip_special)
    pieces = [stream.push(i) for i in ids]
    return pieces, "".join(pieces) + stream.flush()


@settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=40), st.booleans())
def test_stream_decoder_yields_exactly_the_decoded_text(smol, text, skip_special):
    ids = smol.encode(text)
    pieces, streamed = _stream(smol, ids, skip_special)
    assert streamed == smol.decode(ids, skip_special=skip_special)
    assert all("\ufffd" not in p for p in pieces) or "\ufffd" in streamed   # bytes outside the vocabulary


def test_stream_decoder_holds_back_a_split_character(smol):
    ids = smol.encode("😀")             # one character, several byte-level tokens
    assert len(ids) > 1
    pieces, streamed = _stream(smol, ids)
    assert pieces[:-1] == [""] * (len(ids) - 1) and pieces[-1] == "😀" and streamed == "😀"


@settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(0, 49151), max_size=12))
def test_stream_decoder_on_arbitrary_ids(smol, ids):
    assert _stream(smol, ids)[1] == smol.decode(ids)


# ----------------------------------------------------------------------------------- SentencePiece
@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("sp"))


def test_sentencepiece_tokenizer_equals_sentencepiece(sp_model):
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    tok = Tokenizer.from_sentencepiece(sp_model)
    assert (tok.bos_id, tok.eos_ids, tok.add_bos, tok.vocab_size) == (1, (2,), True, sp.get_piece_size())
    for text in sample_text(50, seed=3) + VARIED:
        if "<s>" in text or "</s>" in text:
            continue
        assert tok.encode(text) == [1] + sp.encode(text)
        assert tok.encode(text, add_bos=False) == sp.encode(text)
        assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text))
        assert _stream(tok, sp.encode(text))[1] == sp.decode(sp.encode(text))


def test_sentencepiece_special_text_becomes_its_id(sp_model):
    tok = Tokenizer.from_sentencepiece(sp_model)
    ids = tok.encode("<s>hi</s>", add_bos=False)
    assert ids[0] == 1 and ids[-1] == 2 and 1 not in ids[1:-1]
    assert tok.decode(ids, skip_special=True) == "hi"


def test_sentencepiece_vocabulary_in_gguf_equals_sentencepiece(sp_model):
    """A 'llama' GGUF vocabulary (tokens + scores, byte fallback) rebuilt as BPE gives SentencePiece's ids."""
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    v = gguf_vocab_from_sentencepiece(sp_model)
    tok = tokenizer_from_vocab(model="llama", tokens=v["tokens"], token_types=v["types"], scores=v["scores"],
                                    bos_id=1, eos_ids=[2], unk_id=0, add_bos=True)
    for text in sample_text(80, seed=7) + VARIED:
        if "<s>" in text or "</s>" in text:
            continue
        assert tok.encode(text, add_bos=False) == sp.encode(text), text
        assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text))


@settings(deadline=None, max_examples=80)
@given(st.text(max_size=30))
def test_sentencepiece_vocabulary_in_gguf_on_any_text(sp_vocab_and_model, text):
    tok, sp = sp_vocab_and_model
    if "<s>" in text or "</s>" in text:
        return
    assert tok.encode(text, add_bos=False) == sp.encode(text)


@pytest.fixture(scope="module")
def sp_vocab_and_model(sp_model):
    v = gguf_vocab_from_sentencepiece(sp_model)
    tok = tokenizer_from_vocab(model="llama", tokens=v["tokens"], token_types=v["types"], scores=v["scores"],
                                    bos_id=1, eos_ids=[2], unk_id=0)
    return tok, spm.SentencePieceProcessor(model_file=str(sp_model))


def test_llama3_tiktoken_file_is_refused_clearly(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_text("IQ== 0\nIg== 1\nIw== 2\n")
    with pytest.raises(TokenizerError, match="tiktoken"):
        Tokenizer.from_sentencepiece(path)
    path.write_bytes(b"\x00garbage")
    with pytest.raises(TokenizerError, match="SentencePiece"):
        Tokenizer.from_sentencepiece(path)


# ----------------------------------------------------------------------------------- tokenizer.json
def test_tokenizer_json_equals_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from npllama.formats.hf import hf_tokenizer
    from tiny import CHAT_TEMPLATE

    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=train_bpe(), bos_token="<|im_start|>",
                                                eos_token="<|im_end|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    tok = hf_tokenizer(tmp_path, {}, {})
    assert tok.chat_template == CHAT_TEMPLATE
    assert (tok.bos_id, tok.eos_ids) == (1, (2,))
    for text in VARIED + sample_text(30, seed=1):
        assert tok.encode(text) == ref.encode(text)
        assert tok.decode(tok.encode(text)) == ref.decode(ref.encode(text))


def test_gguf_vocab_errors_are_tokenizer_errors():
    with pytest.raises(TokenizerError, match="pre-tokenizer"):
        tokenizer_from_vocab(model="gpt2", tokens=["a", "b", "ab"], merges=["a b"], pre="no-such-thing")
    with pytest.raises(TokenizerError, match="not supported"):
        tokenizer_from_vocab(model="rwkv", tokens=["a"])
    with pytest.raises(TokenizerError, match="merges"):
        tokenizer_from_vocab(model="gpt2", tokens=["a"])
    with pytest.raises(TokenizerError, match="outside"):
        tokenizer_from_vocab(model="gpt2", tokens=["a", "b", "ab"], merges=["a b"], bos_id=7)
