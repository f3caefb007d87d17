"""The vocabulary a GGUF file carries in its metadata, rebuilt as a Tokenizer.

llama.cpp stores the tokenizer in ``tokenizer.ggml.*`` keys: the token strings, their types
(normal, control, user-defined, byte, ...), and either BPE merges (``model = "gpt2"``: byte-level
BPE, split by the pre-tokenizer named in ``tokenizer.ggml.pre``) or scores (``model = "llama"``:
a SentencePiece BPE vocabulary with byte fallback). This module builds the equivalent
``tokenizers`` object, so encoding and decoding are done by that library, as for tokenizer.json.
Source: llama.cpp's llama-vocab.cpp (pre-tokenizer regexes, token types) and gguf's constants.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..checks import is_int, is_number
from ..errors import TokenizerError
from ..tokenizer import Tokenizer

# GGUF token types (llama.cpp's llama_token_type / gguf.TokenType).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


MAX_VOCAB = 1 << 20          # tokens of one vocabulary (the largest in use have ~262,000)
MAX_TOKEN_CHARS = 4096       # characters of one token (real vocabularies stay under a few hundred)
MAX_TEMPLATE_CHARS = 1 << 20  # characters of a chat template (real ones are a few thousand)
MAX_SPLIT_WORK = 1 << 28     # sum over tokens of len(token)**2: the time of rebuilding SentencePiece merges,
                             # and at worst the bytes of their strings (32,000 pieces of at most 16
                             # characters, SentencePiece's default, cost at most 8.2e6)
MAX_MERGES = 1 << 22         # merges of one vocabulary (given, or rebuilt from scores)


class VocabFields:
    """Typed reads of the ``tokenizer.ggml.*`` metadata: every value's type and range is checked
    where it is read, and a bad one is a TokenizerError naming the key."""

    def __init__(self, meta: dict[str, Any], source: str):
        self.meta, self.source = meta, source

    def _bad(self, key: str, what: str) -> TokenizerError:
        return TokenizerError(f"{self.source}: {key} must be {what}, got {_describe(self.meta.get(key))}")

    def strings(self, key: str, limit: int, max_chars: int, required: bool = True) -> list[str] | None:
        value = self.meta.get(key)
        if value is None:
            if required:
                raise TokenizerError(f"{self.source}: {key} is missing")
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._bad(key, "an array of strings")
        if len(value) > limit:
            raise TokenizerError(f"{self.source}: {key} holds {len(value)} entries; npllama reads at most {limit}")
        longest = max(value, key=len, default="")
        if len(longest) > max_chars:
            i = value.index(longest)
            raise TokenizerError(f"{self.source}: entry {i} of {key} is {len(longest)} characters long; npllama reads "
                                 f"at most {max_chars} (no real vocabulary comes close)")
        return value

    def numbers(self, key: str, length: int, integral: bool = False) -> list | None:
        value = self.meta.get(key)
        if value is None:
            return None
        kind = is_int if integral else is_number
        if not isinstance(value, list) or not all(kind(v) for v in value):
            raise self._bad(key, f"an array of {'integers' if integral else 'numbers'}")
        if len(value) != length:
            raise TokenizerError(f"{self.source}: {key} has {len(value)} entries for {length} tokens")
        if not integral and not all(math.isfinite(v) for v in value):
            raise self._bad(key, "an array of finite numbers")
        return value

    def token_id(self, key: str) -> int | None:
        value = self.meta.get(key)
        if value is None:
            return None
        if not is_int(value) or value < 0:
            raise self._bad(key, "a token id (an integer >= 0)")
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.meta.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._bad(key, "true or false")
        return value

    def text(self, key: str, max_chars: int) -> str | None:
        value = self.meta.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self._bad(key, "a string")
        if len(value) > max_chars:
            raise TokenizerError(f"{self.source}: {key} is {len(value)} characters long; npllama reads at most "
                                 f"{max_chars}")
        return value


def _describe(value: Any) -> str:
    """A short description of a metadata value for an error message."""
    if isinstance(value, list):
        kinds = sorted({type(v).__name__ for v in value[:1000]})
        return f"an array of {len(value)} ({', '.join(kinds) or 'nothing'})"
    return f"{value!r:.80}"


def gguf_tokenizer(meta: dict[str, Any], path: Path) -> Tokenizer | None:
    """The tokenizer described by ``tokenizer.ggml.*`` (None when the file has no vocabulary)."""
    from ..chat_templates import ChatTemplate

    if meta.get("tokenizer.ggml.model") is None or "tokenizer.ggml.tokens" not in meta:
        return None
    f = VocabFields(meta, str(path))
    model = f.text("tokenizer.ggml.model", 64)
    tokens = f.strings("tokenizer.ggml.tokens", MAX_VOCAB, MAX_TOKEN_CHARS)
    eos = [f.token_id(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                   "tokenizer.ggml.eom_token_id")]
    default_bos = model == "llama"   # llama.cpp's (and transformers') default for SentencePiece vocabularies
    template = f.text("tokenizer.chat_template", MAX_TEMPLATE_CHARS)
    try:
        return tokenizer_from_vocab(
            model=model,
            tokens=tokens,
            token_types=f.numbers("tokenizer.ggml.token_type", len(tokens), integral=True),
            merges=f.strings("tokenizer.ggml.merges", MAX_MERGES, 2 * MAX_TOKEN_CHARS + 1, required=False),
            scores=f.numbers("tokenizer.ggml.scores", len(tokens)),
            pre=f.text("tokenizer.ggml.pre", 256),
            bos_id=f.token_id("tokenizer.ggml.bos_token_id"),
            eos_ids=dict.fromkeys(e for e in eos if e is not None),   # unique, in order
            unk_id=f.token_id("tokenizer.ggml.unknown_token_id"),
            add_bos=f.flag("tokenizer.ggml.add_bos_token", default_bos),
            add_space_prefix=f.flag("tokenizer.ggml.add_space_prefix", True),
            chat_template=None if template is None else ChatTemplate(template, f"{path}: tokenizer.chat_template"),
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
    candidates = [(token, i) for token, i in vocab.items()
                  if token_types[i] in (TOKEN_NORMAL, TOKEN_USER_DEFINED) and len(token) >= 2]
    work = sum(len(token) ** 2 for token, _ in candidates)
    if work > MAX_SPLIT_WORK:
        raise TokenizerError(f"{source}: rebuilding this vocabulary's merges means trying {work:.3g} character "
                             f"splits (its tokens are very long); npllama stops at {MAX_SPLIT_WORK:.3g}. Is it a "
                             f"real SentencePiece vocabulary?")
    ranked = []   # (-score, left id, right id): ids, not strings, so memory stays at a few words a merge
    for token, i in candidates:
        score = -float(scores[i])
        for cut in range(1, len(token)):
            left = vocab.get(token[:cut])
            if left is not None:
                right = vocab.get(token[cut:])
                if right is not None:
                    ranked.append((score, left, right))
        if len(ranked) > MAX_MERGES:
            raise TokenizerError(f"{source}: this vocabulary implies more than {MAX_MERGES} merges; is it a real "
                                 f"SentencePiece vocabulary?")
    ranked.sort()
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    try:
        model = models.BPE(vocab=vocab, merges=[(tokens[a], tokens[b]) for _, a, b in ranked], unk_token=unk,
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
