"""The vocabulary a GGUF file carries in its metadata, rebuilt as a Tokenizer.

llama.cpp stores the tokenizer in ``tokenizer.ggml.*`` keys: the token strings, their types
(normal, control, user-defined, byte, ...), and either BPE merges (``model = "gpt2"``: byte-level
BPE, split by the pre-tokenizer named in ``tokenizer.ggml.pre``) or scores (``model = "llama"``:
a SentencePiece BPE vocabulary with byte fallback). This module builds the equivalent
``tokenizers`` object, so encoding and decoding are done by that library, as for tokenizer.json.
Source: llama.cpp's llama-vocab.cpp (pre-tokenizer regexes, token types) and gguf's constants.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import TokenizerError
from ..tokenizer import Tokenizer

# GGUF token types (llama.cpp's llama_token_type / gguf.TokenType).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


def gguf_tokenizer(meta: dict[str, Any], path: Path) -> Tokenizer | None:
    """The tokenizer described by ``tokenizer.ggml.*`` (None when the file has no vocabulary)."""
    model = meta.get("tokenizer.ggml.model")
    if model is None or "tokenizer.ggml.tokens" not in meta:
        return None
    eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                             "tokenizer.ggml.eom_token_id") if meta.get(k) is not None]
    default_bos = model == "llama"   # llama.cpp's (and transformers') default for SentencePiece vocabularies
    try:
        return tokenizer_from_vocab(
            model=str(model),
            tokens=meta["tokenizer.ggml.tokens"],
            token_types=meta.get("tokenizer.ggml.token_type"),
            merges=meta.get("tokenizer.ggml.merges"),
            scores=meta.get("tokenizer.ggml.scores"),
            pre=meta.get("tokenizer.ggml.pre"),
            bos_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_ids=dict.fromkeys(int(e) for e in eos),   # unique, in order
            unk_id=meta.get("tokenizer.ggml.unknown_token_id"),
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", default_bos)),
            add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", True)),
            chat_template=meta.get("tokenizer.chat_template"),
            source=str(path),
        )
    except TokenizerError:
        raise
    except (TypeError, ValueError) as e:
        raise TokenizerError(f"{path}: the tokenizer metadata is malformed ({e})") from None


def tokenizer_from_vocab(*, model: str, tokens: Sequence[str], token_types: Sequence[int] | None = None,
                         merges: Sequence[str] | None = None, scores: Sequence[float] | None = None,
                         pre: str | None = None, bos_id: int | None = None, eos_ids: Iterable[int] = (),
                         unk_id: int | None = None, add_bos: bool = False, add_space_prefix: bool = True,
                         chat_template: str | None = None, source: str = "GGUF") -> Tokenizer:
    """Rebuild a tokenizer from the ``tokenizer.ggml.*`` metadata of a GGUF file.

    model "gpt2": byte-level BPE (tokens spelled in the GPT-2 byte alphabet + merges), split by
    the regex named by ``pre`` (llama.cpp's pre-tokenizer name, e.g. "smollm", "llama-bpe").
    model "llama": a SentencePiece BPE vocabulary (tokens + scores, byte-fallback tokens <0x..>).
    Control tokens (type 3) become special tokens, so "<|im_start|>" encodes to its one id.
    """
    token_types = list(token_types) if token_types is not None else [TOKEN_NORMAL] * len(tokens)
    if len(token_types) != len(tokens):
        raise TokenizerError(f"{source}: {len(tokens)} tokens but {len(token_types)} token types")
    if model == "gpt2":
        tok = _byte_level_bpe(tokens, token_types, merges, pre, source)
    elif model == "llama":
        tok = _sentencepiece_bpe(tokens, token_types, scores, unk_id, add_space_prefix, source)
    else:
        raise TokenizerError(f"{source}: tokenizer.ggml.model {model!r} is not supported; npllama reads "
                             f"'gpt2' (byte-level BPE) and 'llama' (SentencePiece) vocabularies")
    return Tokenizer.from_tokenizers(tok, bos_id=bos_id, eos_ids=eos_ids, chat_template=chat_template,
                                     add_bos=add_bos, source=source)


# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) -> how text is split before BPE.
# GPT-2's regex is what tokenizers' ByteLevel(use_regex=True) applies.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(pre: str | None, source: str):
    """The split for llama.cpp's pre-tokenizer ``pre`` (see llama-vocab.cpp), as a tokenizers object."""
    from tokenizers import Regex, pre_tokenizers as pt

    gpt2 = pt.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in (None, "default", "gpt2", "gpt-2"):
        return gpt2
    if pre in ("smollm", "starcoder", "refact"):
        # SmolLM's own tokenizer.json: each digit alone, then GPT-2's split.
        return pt.Sequence([pt.Digits(individual_digits=True), gpt2])
    regex = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
             "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT, "falcon3": _LLAMA3_SPLIT,
             "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}.get(pre)
    if regex is None:
        raise TokenizerError(f"{source}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not known to npllama; "
                             f"known: default, gpt2, smollm, starcoder, refact, llama-bpe, llama3, qwen2, ...")
    return pt.Sequence([pt.Split(Regex(regex), behavior="isolated"),
                        pt.ByteLevel(add_prefix_space=False, use_regex=False)])


def _add_gguf_special_tokens(tok, tokens: Sequence[str], token_types: Sequence[int]) -> None:
    """Control tokens (type 3) become special added tokens; user-defined ones (type 4) plain added tokens."""
    from tokenizers import AddedToken

    control = [AddedToken(t, special=True, normalized=False)
               for t, kind in zip(tokens, token_types) if kind == TOKEN_CONTROL and t]
    user = [AddedToken(t, special=False, normalized=False)
            for t, kind in zip(tokens, token_types) if kind == TOKEN_USER_DEFINED and t]
    if control:
        tok.add_special_tokens(control)
    if user:
        tok.add_tokens(user)


def _vocab(tokens: Sequence[str], source: str) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)   # a duplicate spelling keeps its first id (llama.cpp does the same)
    if not vocab:
        raise TokenizerError(f"{source}: the vocabulary (tokenizer.ggml.tokens) is empty")
    return vocab


def _byte_level_bpe(tokens, token_types, merges, pre, source):
    """GPT-2-style byte-level BPE: text -> UTF-8 bytes spelled as printable characters -> merges."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models

    if merges is None:
        raise TokenizerError(f"{source}: a 'gpt2' vocabulary needs tokenizer.ggml.merges, which is missing")
    pairs = []
    for m in merges:
        parts = m.split(" ")
        if len(parts) != 2:
            raise TokenizerError(f"{source}: merge {m!r} is not two tokens separated by one space")
        pairs.append((parts[0], parts[1]))
    try:
        tok = HFTokenizer(models.BPE(vocab=_vocab(tokens, source), merges=pairs, ignore_merges=False))
    except Exception as e:
        raise TokenizerError(f"{source}: cannot build the BPE vocabulary ({e})") from None
    tok.pre_tokenizer = _pre_tokenizer(pre, source)
    tok.decoder = decoders.ByteLevel()
    _add_gguf_special_tokens(tok, tokens, token_types)
    return tok


def _sentencepiece_bpe(tokens, token_types, scores, unk_id, add_space_prefix, source):
    """A SentencePiece BPE vocabulary (Llama 1 / 2 in GGUF) as a tokenizers BPE with byte fallback.

    SentencePiece merges the adjacent pair whose union has the highest score; as a BPE merge list
    that is: every split of every token into two tokens, ranked by the token's score.
    Spaces are "▁" and, with add_space_prefix, one is put before the text (the dummy prefix).
    """
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, normalizers

    if scores is None or len(scores) != len(tokens):
        raise TokenizerError(f"{source}: a 'llama' vocabulary needs one score per token (tokenizer.ggml.scores)")
    vocab = _vocab(tokens, source)
    ranked = []
    for token, i in vocab.items():
        if token_types[i] not in (TOKEN_NORMAL, TOKEN_USER_DEFINED) or len(token) < 2:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-float(scores[i]), vocab[left], vocab[right], left, right))
    ranked.sort()
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    try:
        model = models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in ranked], unk_token=unk,
                           fuse_unk=True, byte_fallback=True)
        tok = HFTokenizer(model)
    except Exception as e:
        raise TokenizerError(f"{source}: cannot build the SentencePiece vocabulary ({e})") from None
    steps = [normalizers.Replace(" ", "\u2581")]
    decode = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.insert(0, normalizers.Prepend("\u2581"))
        decode.append(decoders.Strip(" ", 1, 0))
    tok.normalizer = normalizers.Sequence(steps)
    tok.decoder = decoders.Sequence(decode)
    _add_gguf_special_tokens(tok, tokens, token_types)
    return tok
