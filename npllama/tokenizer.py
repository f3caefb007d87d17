"""Text <-> token ids, with the libraries that define the formats: ``tokenizers`` and ``sentencepiece``.

One :class:`Tokenizer` class serves every checkpoint format; its constructors read

* ``tokenizer.json`` (Hugging Face ``tokenizers``)              -> :meth:`Tokenizer.from_tokenizer_json`
* ``tokenizer.model`` (SentencePiece, Llama 1 / 2)              -> :meth:`Tokenizer.from_sentencepiece`
* ``tokenizer.model`` (tiktoken ranks, Llama 3 as Meta ships it)  -> :meth:`Tokenizer.from_tiktoken`
* the vocabulary stored in a GGUF file's metadata               -> formats/gguf_vocab.py

Special tokens are handled by id. ``encode`` finds the text of special tokens (``<|im_start|>``,
``<s>``) and emits their ids, so a rendered chat template tokenizes as the model was trained;
``decode(ids, skip_special=True)`` drops special *ids*, never strings that look special.
BOS is added by ``encode`` (by id) only when asked or when the tokenizer's convention says so.

:class:`StreamDecoder` turns ids arriving one at a time into text that will not change, holding
back bytes of a character split across tokens.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Iterable

from .checks import is_int
from .errors import TokenizerError


_NORMALIZE_MARGIN = 64   # characters around a cut that a normalizer may join with what follows


class Tokenizer:
    """A vocabulary with encode/decode, its special ids and its chat template.

    vocab_size   ids are 0 .. vocab_size - 1 (added tokens included)
    bos_id       beginning-of-sequence id, or None
    eos_ids      ids that end a generation (Llama 3: <|end_of_text|> and <|eot_id|>; SmolLM2: <|im_end|>)
    add_bos      the tokenizer's convention: does ``encode`` prepend BOS when not told?
    chat_template  the Jinja chat template shipped with the tokenizer, or None
    chat_format  the name of the built-in chat format (npllama.chat_templates.BUILTIN_TEMPLATES) for a checkpoint
                 that ships no template but says which format it was trained on (a Meta Llama 3
                 folder: "llama3", or "llama3.1" when params.json says use_scaled_rope), or None
    special_ids  ids of control tokens (never produced by plain text)
    """

    def __init__(self, backend: "_Backend", *, bos_id: int | None = None, eos_ids: Iterable[int] = (),
                 chat_template: str | None = None, add_bos: bool = False, source: str = "tokenizer",
                 chat_format: str | None = None):
        self._backend = backend
        self.source = source
        self.chat_format = chat_format
        self.vocab_size = backend.vocab_size
        self.bos_id = None if bos_id is None else self._check_id(bos_id, "bos_id")
        self.eos_ids = tuple(self._check_id(i, "eos id") for i in eos_ids)
        self.chat_template = chat_template
        self.add_bos = bool(add_bos)
        special = set(backend.special_ids)
        special.update(i for i in (self.bos_id, *self.eos_ids) if i is not None)
        self.special_ids = frozenset(special)
        self._per_token: tuple[int | None] | None = None

    def _check_id(self, i, what: str) -> int:
        if not is_int(i):
            raise TokenizerError(f"{self.source}: {what} must be an integer token id, got {i!r}")
        i = int(i)
        if not 0 <= i < self.vocab_size:
            raise TokenizerError(f"{self.source}: {what} {i} lies outside the vocabulary (0..{self.vocab_size - 1})")
        return i

    def __repr__(self) -> str:
        return (f"Tokenizer({self._backend.kind}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_ids={self.eos_ids}, source={self.source!r})")

    # ---------------------------------------------------------------- text -> ids
    def encode(self, text: str, add_bos: bool | None = None, add_eos: bool = False) -> list[int]:
        """Token ids of ``text``. Special-token text in ``text`` becomes its single id.

        add_bos: True/False to force; None follows the tokenizer's convention (``self.add_bos``).
        """
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:   # lone surrogates: bytes that were not UTF-8, decoded with surrogateescape
            raise TokenizerError(f"the text holds {text[e.start:e.end]!r} at character {e.start}, which is not "
                                 f"Unicode text (bytes that were not UTF-8?); give UTF-8 text") from None
        ids = self._backend.encode(text)
        if add_bos if add_bos is not None else self.add_bos:
            if self.bos_id is None:
                raise TokenizerError(f"{self.source}: asked to add BOS, but this tokenizer has no BOS token")
            ids = [self.bos_id, *ids]
        if add_eos:
            if not self.eos_ids:
                raise TokenizerError(f"{self.source}: asked to add EOS, but this tokenizer has no EOS token")
            ids = [*ids, self.eos_ids[0]]
        return ids

    def fewest_tokens(self, text: str, limit: int) -> int:
        """A lower bound on len(self.encode(text)) found without tokenizing: what refuses, before
        any work, a text that cannot fit ``limit`` tokens (one line of 100 MB must not reach the
        tokenizer, which keeps dozens of bytes per byte of text).

        A token of a byte-level BPE or of SentencePiece with byte fallback stands for at most as
        many bytes of text as its spelling in the vocabulary has (one character per byte, "▁"
        three bytes for a space, "<0x41>" six for one byte), so a text whose normalized form has
        N bytes takes at least N / ``bytes_per_token`` tokens; bytes_per_token also counts what
        the normalizer prepends to each run of text between special tokens (SentencePiece's "▁"),
        as each such run makes a token of its own. Only a prefix is normalized, long enough to
        show that the bound passes ``limit``. 0 (no bound) for a tokenizer that may drop text (a
        pre-tokenizer that removes whitespace) or fold a run of it into one <unk>.
        """
        per = self.bytes_per_token
        if per is None:
            return 0
        prefix = text[: (limit + 1) * per + _NORMALIZE_MARGIN]
        shown = len(self._backend.normalize(prefix).encode("utf-8", "surrogatepass"))
        shown -= _NORMALIZE_MARGIN                # what a cut may split, and what the normalizer adds once
        return max(0, -(-shown // per))

    @property
    def bytes_per_token(self) -> int | None:
        """The most bytes of (normalized) text one token can stand for; None where nothing bounds it."""
        if self._per_token is None:
            self._per_token = (self._backend.bytes_per_token(),)
        return self._per_token[0]

    # ---------------------------------------------------------------- ids -> text
    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """The text of ``ids``. skip_special drops the ids in ``special_ids`` (by id, before decoding).

        Raises TokenizerError for an id outside 0 .. vocab_size - 1.
        """
        checked = []
        for i in ids:
            try:
                j = int(i)
            except (TypeError, ValueError):
                raise TokenizerError(f"decode expects integer token ids, got {i!r}") from None
            if j != i or not 0 <= j < self.vocab_size:
                raise TokenizerError(f"token id {i!r} lies outside the vocabulary (0..{self.vocab_size - 1})")
            checked.append(j)
        if skip_special:
            checked = [i for i in checked if i not in self.special_ids]
        return self._backend.decode(checked)

    def token_to_id(self, token: str) -> int | None:
        """The id of one token spelled as in the vocabulary (e.g. "<|im_end|>"), or None."""
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary's spelling of one id (byte-level tokens use the GPT-2 byte alphabet: "Ġ" is a space)."""
        i = int(token_id)
        if not 0 <= i < self.vocab_size:
            raise TokenizerError(f"token id {token_id!r} lies outside the vocabulary (0..{self.vocab_size - 1})")
        return self._backend.id_to_token(i)

    # ---------------------------------------------------------------- as files
    def to_files(self) -> dict[str, bytes]:
        """The tokenizer as a Hugging Face folder holds it, so that a checkpoint written elsewhere
        (npllama convert) carries it: tokenizer.json (or tokenizer.model, for SentencePiece),
        tokenizer_config.json (BOS/EOS spellings, add_bos_token, the chat template) and
        generation_config.json (the BOS and EOS ids)."""
        import json

        files = self._backend.to_files()
        config: dict = {"add_bos_token": self.add_bos}
        if self.bos_id is not None:
            config["bos_token"] = self.id_to_token(self.bos_id)
        if self.eos_ids:
            config["eos_token"] = self.id_to_token(self.eos_ids[0])
        if self.chat_template:
            config["chat_template"] = str(self.chat_template)
        generation = {"bos_token_id": self.bos_id,
                      "eos_token_id": list(self.eos_ids) if len(self.eos_ids) > 1 else
                      (self.eos_ids[0] if self.eos_ids else None)}
        files["tokenizer_config.json"] = (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode()
        files["generation_config.json"] = (json.dumps(generation, indent=2) + "\n").encode()
        return files

    # ---------------------------------------------------------------- constructors
    @classmethod
    def from_tokenizer_json(cls, path: str | os.PathLike, *, bos_id: int | None = None,
                            eos_ids: Iterable[int] = (), chat_template: str | None = None,
                            add_bos: bool | None = None, bos_token: str | None = None,
                            eos_token: str | None = None) -> "Tokenizer":
        """A Hugging Face ``tokenizer.json``.

        bos_token / eos_token: spellings to look up when bos_id / eos_ids are not given
        (tokenizer_config.json names them that way). add_bos None: whatever its post-processor does.
        """
        from tokenizers import Tokenizer as HFTokenizer

        _refuse_crashing_bpe(Path(path))
        try:
            tok = HFTokenizer.from_file(str(path))
            probe = tok.encode("", add_special_tokens=True).ids
        except BaseException as e:  # plain Exceptions for bad files; a Rust panic is a BaseException
            if not _library_failure(e):
                raise
            raise TokenizerError(f"{path}: not a readable tokenizer.json ({e}); re-save it with "
                                 f"transformers or tokenizers") from None
        if bos_id is None and bos_token is not None:
            bos_id = tok.token_to_id(bos_token)
        eos_ids = tuple(eos_ids)
        if not eos_ids and eos_token is not None and tok.token_to_id(eos_token) is not None:
            eos_ids = (tok.token_to_id(eos_token),)
        if add_bos is None:  # does the template processor put BOS first?
            add_bos = bos_id is not None and probe[:1] == [bos_id]
        return cls(_TokenizersBackend(tok), bos_id=bos_id, eos_ids=eos_ids, chat_template=chat_template,
                   add_bos=add_bos, source=str(path))

    @classmethod
    def from_sentencepiece(cls, path: str | os.PathLike, *, bos_id: int | None = -1,
                           eos_ids: Iterable[int] | None = None, chat_template: str | None = None,
                           add_bos: bool = True) -> "Tokenizer":
        """A SentencePiece ``tokenizer.model`` (Llama 1 / 2). BOS is prepended by default, as Meta does.

        bos_id -1 / eos_ids None: take them from the model file.
        """
        import sentencepiece

        path = Path(path)
        _refuse_tiktoken(path)
        sp = sentencepiece.SentencePieceProcessor()
        try:
            sp.Load(str(path))
        except Exception as e:
            raise TokenizerError(f"{path}: not a readable SentencePiece model ({e})") from None
        if bos_id == -1:
            bos_id = sp.bos_id() if sp.bos_id() >= 0 else None
        if eos_ids is None:
            eos_ids = (sp.eos_id(),) if sp.eos_id() >= 0 else ()
        return cls(_SentencePieceBackend(sp), bos_id=bos_id, eos_ids=eos_ids, chat_template=chat_template,
                   add_bos=add_bos, source=str(path))

    @classmethod
    def from_tiktoken(cls, path: str | os.PathLike, *, version: str = "3.1",
                      chat_template: str | None = None, add_bos: bool = True) -> "Tokenizer":
        """Llama 3's ``tokenizer.model`` as Meta ships it: a tiktoken rank file (one ``base64(token)
        rank`` per line), read with the ``tiktoken`` library and given Llama 3's split pattern and
        256 special tokens (LLAMA3_SPECIAL_TOKENS[version]: "3" for Llama 3, "3.1" for 3.1 and
        later). BOS (<|begin_of_text|>) is prepended by default, as Meta does; generation stops at
        Meta's stop tokens (<|end_of_text|>, <|eom_id|> from 3.1 on, <|eot_id|>).

        The ids equal those of the same model's tokenizer.json (tests/test_llama3.py). tiktoken
        keeps a copy of every file it reads in its cache folder ($TIKTOKEN_CACHE_DIR, else
        data-gym-cache in the temporary folder) under the file's path; the file's SHA-256 is
        passed along, so a file replaced at the same path is read anew.
        """
        import hashlib

        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        from .io import read_regular

        if version not in LLAMA3_SPECIAL_TOKENS:
            raise TokenizerError(f"unknown Llama 3 tokenizer version {version!r}; choose one of "
                                 f"{', '.join(LLAMA3_SPECIAL_TOKENS)}")
        path = Path(path).expanduser().absolute()   # absolute, so tiktoken never reads it as a URL
        raw = read_regular(path, MAX_TIKTOKEN_BYTES, TokenizerError)
        if not is_tiktoken_file(path):
            raise TokenizerError(f"{path}: not a tiktoken rank file (lines of 'base64-token rank'); is it a "
                                 f"SentencePiece model (Llama 1 / 2)? Those load with Tokenizer.from_sentencepiece")
        try:
            ranks = load_tiktoken_bpe(str(path), expected_hash=hashlib.sha256(raw).hexdigest())
        except (ValueError, OSError) as e:
            raise TokenizerError(f"{path}: not a readable tiktoken rank file ({str(e).splitlines()[0]:.200}); "
                                 f"is it Llama 3's tokenizer.model?") from None
        n = len(ranks)
        if n == 0 or min(ranks.values()) != 0 or max(ranks.values()) != n - 1 or len(set(ranks.values())) != n:
            raise TokenizerError(f"{path}: the ranks of its {n} tokens are not 0 .. {n - 1}, each once; the file "
                                 f"is damaged")
        specials = {token: n + i for i, token in enumerate(LLAMA3_SPECIAL_TOKENS[version])}
        try:
            enc = tiktoken.Encoding(name=path.name, pat_str=LLAMA3_SPLIT_PATTERN, mergeable_ranks=ranks,
                                    special_tokens=specials)
        except BaseException as e:   # ValueError for a bad vocabulary; a Rust panic is a BaseException
            if not _library_failure(e):
                raise
            raise TokenizerError(f"{path}: tiktoken cannot build a tokenizer from it ({e}); is it Llama 3's "
                                 f"tokenizer.model?") from None
        stops = [t for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>") if t in specials]
        return cls(_TiktokenBackend(enc, specials, raw), bos_id=specials["<|begin_of_text|>"],
                   eos_ids=[specials[t] for t in stops], chat_template=chat_template, add_bos=add_bos,
                   source=str(path), chat_format="llama3" if version == "3" else "llama3.1")

    @classmethod
    def from_tokenizers(cls, tok, *, bos_id: int | None = None, eos_ids: Iterable[int] = (),
                        chat_template: str | None = None, add_bos: bool = False,
                        source: str = "tokenizer") -> "Tokenizer":
        """A ``tokenizers.Tokenizer`` object built elsewhere (the GGUF vocabulary, formats/gguf_vocab.py)."""
        return cls(_TokenizersBackend(tok), bos_id=bos_id, eos_ids=eos_ids, chat_template=chat_template,
                   add_bos=add_bos, source=source)


# ------------------------------------------------------------------------ streaming
class StreamDecoder:
    """Decode ids one at a time into the text that has become final.

        stream = StreamDecoder(tokenizer)
        for token_id in generated:
            print(stream.push(token_id), end="", flush=True)
        print(stream.flush())

    The concatenation of every push() and the final flush() equals tokenizer.decode(all ids).
    A token may end inside a multi-byte character (byte-level BPE, byte fallback); its text is
    held back while the decoded window ends in U+FFFD. Each step decodes a small window that
    starts at an earlier token, so tokenizers that drop a leading space of the first token
    (SentencePiece) still yield the space. (The offsets scheme of text-generation-inference.)
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self.ids: list[int] = []
        self._prefix = 0   # the window decoded for context starts here
        self._read = 0     # ids before this have been emitted

    def push(self, token_id: int) -> str:
        """Add one id; return the text that is now final ("" while a character is incomplete)."""
        self.ids.append(int(token_id))
        decode = lambda ids: self.tokenizer.decode(ids, skip_special=self.skip_special)  # noqa: E731
        before = decode(self.ids[self._prefix:self._read])
        after = decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD)."""
        decode = lambda ids: self.tokenizer.decode(ids, skip_special=self.skip_special)  # noqa: E731
        before = decode(self.ids[self._prefix:self._read])
        after = decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return after[len(before):]


# ------------------------------------------------------------------------ backends
class _Backend:
    kind = "?"
    vocab_size: int
    special_ids: frozenset

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def token_to_id(self, token: str) -> int | None: ...
    def id_to_token(self, i: int) -> str: ...
    def to_files(self) -> dict[str, bytes]: ...
    def normalize(self, text: str) -> str: ...
    def bytes_per_token(self) -> int | None: ...


class _TokenizersBackend(_Backend):
    """A ``tokenizers.Tokenizer``; its added special tokens are found in text by the library."""

    kind = "tokenizers"

    def __init__(self, tok):
        self.tok = tok
        # one past the largest id (not the number of entries: a vocabulary may have holes)
        self.vocab_size = max(tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        self.special_ids = frozenset(i for i, t in tok.get_added_tokens_decoder().items() if t.special)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def to_files(self) -> dict[str, bytes]:
        return {"tokenizer.json": self.tok.to_str().encode()}

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, i: int) -> str:
        return self.tok.id_to_token(i)

    def normalize(self, text: str) -> str:
        return text if self.tok.normalizer is None else self.tok.normalizer.normalize_str(text)

    def bytes_per_token(self) -> int | None:
        """The longest spelling in the vocabulary (4 at least where <unk> stands for one unknown
        character); None where the pre-tokenizer may drop text or <unk> may fuse a run of it."""
        model = self.tok.model
        if type(model).__name__ != "BPE" or not _keeps_text(self.tok.pre_tokenizer):
            return None
        unk = model.unk_token is not None and not model.byte_fallback
        if unk and model.fuse_unk:
            return None
        longest = max((len(t.encode("utf-8", "surrogatepass")) for t in self.tok.get_vocab(with_added_tokens=True)),
                      default=1)
        return max(longest, 4 if unk else 1) + _prepended(self.tok.normalizer)


class _SentencePieceBackend(_Backend):
    """A ``sentencepiece.SentencePieceProcessor``.

    SentencePiece itself reads "<s>" in text as three characters; like transformers' LlamaTokenizer,
    npllama cuts the text at the spelling of control tokens and emits their ids, encoding the
    pieces in between separately (each gets SentencePiece's dummy-prefix space).
    """

    kind = "sentencepiece"

    def __init__(self, sp):
        self.sp = sp
        self.vocab_size = sp.get_piece_size()
        self.special_ids = frozenset(i for i in range(self.vocab_size) if sp.IsControl(i))
        spellings = {sp.IdToPiece(i): i for i in self.special_ids if sp.IdToPiece(i)}
        self._special = spellings
        self._split = (re.compile("(" + "|".join(map(re.escape, sorted(spellings, key=len, reverse=True))) + ")")
                       if spellings else None)

    def to_files(self) -> dict[str, bytes]:
        return {"tokenizer.model": self.sp.serialized_model_proto()}

    def encode(self, text: str) -> list[int]:
        if self._split is None:
            return list(self.sp.EncodeAsIds(text))
        ids: list[int] = []
        for k, part in enumerate(self._split.split(text)):
            if k % 2:                      # odd parts are the matched special spellings
                ids.append(self._special[part])
            elif part:
                ids.extend(self.sp.EncodeAsIds(part))
        return ids

    def decode(self, ids: list[int]) -> str:
        out, run = [], []
        for i in ids:                      # SentencePiece decodes control ids to "": spell them out
            if i in self.special_ids:
                out.append(self.sp.DecodeIds(run) if run else "")
                out.append(self.sp.IdToPiece(i))
                run = []
            else:
                run.append(i)
        out.append(self.sp.DecodeIds(run) if run else "")
        return "".join(out)

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.PieceToId(token)
        return None if i == self.sp.unk_id() and token != self.sp.IdToPiece(i) else i

    def id_to_token(self, i: int) -> str:
        return self.sp.IdToPiece(i)

    def normalize(self, text: str) -> str:
        return self.sp.Normalize(text)

    def bytes_per_token(self) -> int | None:
        """The longest piece, where byte fallback spells every unknown byte ("<0x41>"); None without
        it (unknown characters then become <unk>, whose text is not bounded)."""
        if self.sp.PieceToId("<0x41>") == self.sp.unk_id():
            return None
        longest = max((len(self.sp.IdToPiece(i).encode("utf-8", "surrogatepass")) for i in range(self.vocab_size)),
                      default=1)
        return longest + len("\u2581".encode())     # the dummy prefix, given to each run between special tokens


_TEXT_KEEPING = {"ByteLevel", "Metaspace", "Digits", "UnicodeScripts", "Punctuation", "Split"}


def _keeps_text(pre_tokenizer) -> bool:
    """Whether a tokenizers pre-tokenizer keeps every character (splits, marks spaces) rather than
    dropping some (Whitespace, WhitespaceSplit, CharDelimiterSplit, behavior "Removed")."""
    import json

    if pre_tokenizer is None:
        return True
    stack = [json.loads(pre_tokenizer.__getstate__())]
    while stack:
        node = stack.pop()
        if node.get("type") == "Sequence":
            stack.extend(node.get("pretokenizers", []))
        elif node.get("type") not in _TEXT_KEEPING or node.get("behavior") == "Removed":
            return False
    return True


def _prepended(normalizer) -> int:
    """The UTF-8 bytes a tokenizers normalizer prepends to a run of text (Prepend steps), 0 if none."""
    import json

    if normalizer is None:
        return 0
    total, stack = 0, [json.loads(normalizer.__getstate__())]
    while stack:
        node = stack.pop()
        stack.extend(node.get("normalizers", []) if node.get("type") == "Sequence" else [])
        if node.get("type") == "Prepend":
            total += len(str(node.get("prepend", "")).encode("utf-8", "surrogatepass"))
    return total


# ------------------------------------------------------------------------ Llama 3 (tiktoken)
# Meta's llama3 / llama-models tokenizer.py: the pre-tokenizer's split pattern (GPT-4's cl100k
# pattern), and the 256 special tokens that follow the 128,000 ranks, in id order. Llama 3 named
# 10 of them and reserved the rest; Llama 3.1 (and 3.2, 3.3) named 11, and its reserved tokens
# are numbered from 2 (as the tokenizer.json of Llama 3.2 spells them too). Releases differ only in
# how they spell reserved tokens: the ids of the named ones never move.
LLAMA3_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                        r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_NAMED = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                 "<|reserved_special_token_1|>", "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
                 "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>")
_LLAMA31_NAMED = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>")
LLAMA3_SPECIAL_TOKENS = {
    "3": _LLAMA3_NAMED + tuple(f"<|reserved_special_token_{i}|>" for i in range(5, 256 - 5)),
    "3.1": _LLAMA31_NAMED + tuple(f"<|reserved_special_token_{2 + i}|>" for i in range(256 - 11)),
}
MAX_TIKTOKEN_BYTES = 64 << 20   # Llama 3's rank file is 2.2 MB
# Meta's reference cuts text into runs of at most this many whitespace or non-whitespace
# characters, as tiktoken's regex runs out of backtracking stack on very long runs (a million spaces).
MAX_RUN_CHARS = 25_000


def is_tiktoken_file(path: Path) -> bool:
    """Does the file start like a tiktoken rank file ("<base64> <rank>" lines), as Llama 3's tokenizer.model?"""
    from .io import open_regular

    with open_regular(path, TokenizerError) as f:
        head = f.read(256)
    first = head.split(b"\n", 1)[0].split(b" ")
    return len(first) == 2 and first[1].strip().isdigit() and bool(re.fullmatch(rb"[A-Za-z0-9+/=]+", first[0]))


@functools.lru_cache(maxsize=1)
def _byte_alphabet() -> tuple[str, ...]:
    """GPT-2's byte-level alphabet (Radford et al. 2019, encoder.py ``bytes_to_unicode``): the printable
    character that spells each byte in a byte-level BPE vocabulary (byte 0x20, a space, is "Ġ")."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelled, extra = {}, 0
    for b in range(256):
        if b in printable:
            spelled[b] = chr(b)
        else:
            spelled[b] = chr(256 + extra)
            extra += 1
    return tuple(spelled[b] for b in range(256))


@functools.lru_cache(maxsize=1)
def _byte_of() -> dict[str, int]:
    """The inverse of _byte_alphabet: character -> byte."""
    return {c: b for b, c in enumerate(_byte_alphabet())}


def _meta_runs(text: str, limit: int = MAX_RUN_CHARS) -> Iterable[str]:
    """``text`` cut so that no piece holds more than ``limit`` consecutive whitespace or
    non-whitespace characters (Meta's ``_split_whitespaces_or_nonwhitespaces``)."""
    start, run, space = 0, 0, text[:1].isspace()
    for i, ch in enumerate(text):
        if ch.isspace() != space:
            run, space = 1, ch.isspace()
        else:
            run += 1
            if run > limit:
                yield text[start:i]
                start, run = i, 1
    yield text[start:]


class _TiktokenBackend(_Backend):
    """A ``tiktoken.Encoding`` with Llama 3's special tokens, found in text by spelling ("all" allowed)."""

    kind = "tiktoken"

    def __init__(self, enc, specials: dict[str, int], raw: bytes):
        self.enc = enc
        self.vocab_size = enc.n_vocab
        self.special_ids = frozenset(specials.values())
        self._specials = specials
        self._spelling = {i: t for t, i in specials.items()}
        self._raw = raw

    def encode(self, text: str) -> list[int]:
        try:
            return self.enc.encode(text, allowed_special="all")
        except BaseException as e:   # tiktoken's regex ran out of stack on a run of ~a million characters:
            if not (isinstance(e, ValueError) or type(e).__name__ == "PanicException"):   # (a Rust panic in old releases)
                raise
            ids: list[int] = []
            for piece in _meta_runs(text):   # as Meta's reference cuts it (ids may then differ at the cuts)
                ids.extend(self.enc.encode(piece, allowed_special="all"))
            return ids

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids, errors="replace")

    def token_to_id(self, token: str) -> int | None:
        if token in self._specials:
            return self._specials[token]
        byte_of = _byte_of()
        if not token or any(c not in byte_of for c in token):
            return None
        try:
            return self.enc.encode_single_token(bytes(byte_of[c] for c in token))
        except KeyError:
            return None

    def id_to_token(self, i: int) -> str:
        if i in self._spelling:
            return self._spelling[i]
        alphabet = _byte_alphabet()
        return "".join(alphabet[b] for b in self.enc.decode_single_token_bytes(i))

    def to_files(self) -> dict[str, bytes]:
        return {"tokenizer.model": self._raw}


def _library_failure(e: BaseException) -> bool:
    """An error the tokenizers library raised about its input: an Exception, or a Rust panic."""
    return isinstance(e, Exception) or type(e).__name__ == "PanicException"


def _refuse_crashing_bpe(path: Path) -> None:
    """Refuse a tokenizer.json that crashes the tokenizers library itself, before handing it over.

    A BPE model with a continuing_subword_prefix cuts that many bytes off merges that may not
    carry it; tokenizers then panics inside a multi-byte character and aborts the interpreter,
    which no except clause can catch. Llama-family tokenizers never set it.
    """
    from .io import read_json

    try:
        data = read_json(path, TokenizerError)
    except TokenizerError as e:
        raise TokenizerError(f"{e}; re-save it with transformers or tokenizers") from None
    model = data.get("model") if isinstance(data, dict) else None
    if isinstance(model, dict) and model.get("continuing_subword_prefix"):
        raise TokenizerError(f"{path}: the BPE model sets continuing_subword_prefix "
                             f"{model['continuing_subword_prefix']!r}, which Llama-family tokenizers never use "
                             f"(and which can crash the tokenizers library); is this the model's tokenizer?")


def _refuse_tiktoken(path: Path) -> None:
    """Llama 3's tokenizer.model is a tiktoken rank file (base64 token, rank per line), not SentencePiece."""
    if is_tiktoken_file(path):
        raise TokenizerError(f"{path}: this is a Llama 3 tiktoken vocabulary, not a SentencePiece model; "
                             f"read it with Tokenizer.from_tiktoken (npllama.load reads a Meta Llama 3 "
                             f"folder as such)")
