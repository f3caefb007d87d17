"""How much memory a model takes, estimated from its config before any of it is allocated, and how
much the machine has: the figures behind npllama.load's mapped=None and the refusals of work that
would not fit.

The peak of a run is what is held throughout plus the largest moment of one forward call:

    weights        held in memory: the float arrays of an in-memory model (0 for matrices left in
                   a mapped file: the page cache holds those, and it gives pages back under pressure)
    the KV cache   n_layers x 2 (k, v) x batch x capacity x n_kv_heads x head_dim x itemsize, its
                   capacity grown by doubling from 256 slots to hold the positions (npllama.cache)
    one call       the largest of its moments, for `tokens` new columns attending to `kv_len` keys:
                   the LM head      logits (batch, tokens, vocab) in the compute dtype, and their
                                    float32 copy when that is float64
                   attention        the score matrix, 3.5 copies at once inside the softmax
                                    (naive attention); 2.9 tiles of scores beside q, k, v and
                                    the output (blockwise)
                   the feed-forward 3.25 arrays of (batch, tokens, hidden_dim) at once: w1's and w3's
                                    outputs and SwiGLU's temporaries
                   plus the residual stream and its norm, and for a mapped model the pieces of
                   weights being made float (WEIGHTS_PER_PIECE each, one per PRODUCT_THREADS)

``generation_peak_bytes`` adds the steps of generate: the prefill call with the cache holding the
prompt, and the last decode step with the cache holding prompt and answer (the prefill's logits
still held) — the larger of the two. The figures are NumPy's allocations; the interpreter and the
libraries take a further 100-300 MB, which ``check_fits`` leaves room for (RESERVE_BYTES).
tests/test_mapped.py holds the estimate within 10% of the peak tracemalloc sees. ``batch_bytes``
sizes the batches of ``generate --prompts`` (npllama.inputs.plan_batches).
"""

from __future__ import annotations

import os
from typing import Iterable

import numpy as np

from .cache import INITIAL_CAPACITY, grown_capacity
from .config import ModelArgs
from .errors import InputError
from .layout import BLOCK_K, BLOCK_Q, FLASH_MIN_LEN   # blockwise attention from 256 keys on
from .quant.matrix import PRODUCT_THREADS, WEIGHTS_PER_PIECE, QuantizedMatrix
from .rope_scaling import context_window

RESERVE_BYTES = 512 << 20   # the interpreter, the libraries and the allocator's slack, kept free


def weight_count(args: ModelArgs) -> int:
    """The number of weights a checkpoint of this config holds (params.param_shapes, counted
    without listing them: a config may ask for a billion layers, and is refused elsewhere)."""
    d, hd, hid = args.dim, args.head_dim, args.hidden_dim
    q, kv = args.n_heads * hd, args.n_kv_heads * hd
    layer = 2 * d + (q + 2 * kv) * d + d * q + 3 * hid * d
    layer += (q + 2 * kv) * args.attention_bias + d * args.attention_out_bias + (2 * hid + d) * args.mlp_bias
    return args.vocab_size * d * (1 if args.tie_word_embeddings else 2) + d + args.n_layers * layer


def _itemsize(dtype) -> int:
    return dtype.itemsize if isinstance(getattr(dtype, "itemsize", None), int) else np.dtype(dtype).itemsize


def cache_slots(length: int, window: int, prefill: int | None = None) -> int:
    """The capacity of a KV cache that holds ``length`` positions, grown as npllama.cache.KVCache
    grows (from INITIAL_CAPACITY slots, at most the window): one call of ``prefill`` positions
    (default: all ``length`` at once), then one position at a time."""
    capacity = min(INITIAL_CAPACITY, window)
    first = length if prefill is None else min(prefill, length)
    if first > capacity:
        capacity = grown_capacity(capacity, first)
    while capacity < length:
        capacity = grown_capacity(capacity, capacity + 1)
    return capacity


def kv_cache_bytes(args: ModelArgs, batch: int, length: int, dtype=np.float32, prefill: int | None = None) -> int:
    """Bytes of the KV cache holding ``length`` positions of ``batch`` rows (its capacity, not
    less), the first ``prefill`` of them written at once (default: all)."""
    slots = cache_slots(length, max(context_window(args), length), prefill)
    return args.n_layers * 2 * batch * slots * args.n_kv_heads * args.head_dim * _itemsize(dtype)


def forward_bytes(args: ModelArgs, batch: int, tokens: int, kv_len: int | None = None, dtype=np.float32,
                  mapped: bool = False, piece_weights: int = WEIGHTS_PER_PIECE, attention: str = "auto") -> int:
    """Bytes one forward call allocates at its largest moment (see the module docstring), for
    ``tokens`` new columns of ``batch`` rows attending to ``kv_len`` keys (default: tokens);
    mapped: its matrices are made float a piece at a time (piece_bytes) while they multiply."""
    s = _itemsize(dtype)
    f = max(s, 4)                                  # the softmax runs in float32 at least
    kv_len = tokens if kv_len is None else kv_len
    rows = batch * tokens
    d, hid, vocab = args.dim, args.hidden_dim, args.vocab_size
    stream = rows * d * s                          # one (batch, tokens, dim) array
    logits = rows * vocab * s
    head = logits + (rows * vocab * 4 if s != 4 else 0)          # and their float32 copy
    ffn = 13 * rows * hid * s // 4                 # w1's output through SwiGLU, beside w3's
    if mapped:                                     # a piece beside the product's input copy and output
        head = max(head, logits + rows * d * s + piece_bytes(args, dtype, piece_weights, head=True))
        ffn = max(ffn, 2 * rows * hid * s + piece_bytes(args, dtype, piece_weights))
    flash = attention == "flash" or (attention == "auto" and kv_len >= FLASH_MIN_LEN and tokens > 1)
    if flash:                                      # 2.9 tiles of scores beside q, k, v and the output
        qkv = rows * (2 * args.n_heads + 2 * args.n_kv_heads) * args.head_dim * s
        scores = 29 * batch * args.n_heads * largest_tile(tokens, kv_len) * f // 10 + qkv
    else:
        scores = 7 * batch * args.n_heads * tokens * kv_len * f // 2
    # beside the head: the residual stream and its norm; beside the rest: also the sublayer's output
    return max(head + 2 * stream, scores + 3 * stream, ffn + 3 * stream)


def largest_tile(tokens: int, kv_len: int) -> int:
    """Scores in the largest tile blockwise causal attention computes: BLOCK_Q queries by at most
    BLOCK_K keys, each query tile reading only keys up to its last query (npllama.attention)."""
    largest, offset = 0, kv_len - tokens
    for first in range(0, tokens, BLOCK_Q):
        rows = min(BLOCK_Q, tokens - first)
        largest = max(largest, rows * min(BLOCK_K, max(0, offset + first + rows)))
    return largest


def piece_bytes(args: ModelArgs, dtype=np.float32, piece_weights: int = WEIGHTS_PER_PIECE, head: bool = False) -> int:
    """Bytes of the pieces of a mapped matrix made float at once (the LM head's with head, else the
    layers' largest): one per PRODUCT_THREADS (npllama.quant.matrix), each whole rows, about
    piece_weights of them, as a uint32 (bfloat16's bits moved up) and, for float64, its float64 copy."""
    d, q, kv, hid = args.dim, args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.hidden_dim
    shapes = ((args.vocab_size, d),) if head else ((q, d), (kv, d), (d, q), (hid, d), (d, hid))
    largest = 0
    for n_out, n_in in shapes:
        rows = min(max(1, piece_weights // n_in), n_out)
        largest = max(largest, min(PRODUCT_THREADS, -(-n_out // rows)) * rows * n_in)
    return largest * (4 + (8 if _itemsize(dtype) == 8 else 0))


def loss_bytes(args: ModelArgs, batch: int, tokens: int, dtype=np.float32, mapped: bool = False) -> int:
    """The peak of model.loss on (batch, tokens) ids: the forward's logits, held, beside the
    cross-entropy's float copy of them and its exp (npllama.model.cross_entropy_loss)."""
    logits = batch * tokens * args.vocab_size * 4
    return max(forward_bytes(args, batch, tokens, tokens, dtype, mapped), logits + 2 * logits * max(_itemsize(dtype), 4) // 4)


def trace_bytes(args: ModelArgs, batch: int, tokens: int, dtype=np.float64, mapped: bool = False,
                names: Iterable[str] | None = None) -> int:
    """The peak of npllama.oracle.trace: the traced activations it keeps (names; default every one
    of model.trace_names), each (batch, tokens, width) in dtype and the logits in float32, beside
    one forward call (attention as the trace runs it: blockwise from layout.FLASH_MIN_LEN keys)."""
    s, rows = _itemsize(dtype), batch * tokens
    if names is None:           # per layer six of width dim, q and scores_v, k and v; the embeddings, the norm
        q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        kept = rows * s * (args.n_layers * (6 * args.dim + 2 * q + 2 * kv) + 2 * args.dim) + rows * args.vocab_size * 4
    else:
        kept = sum(rows * activation_width(args, name) * (4 if name == "logits" else s) for name in names)
    return kept + forward_bytes(args, batch, tokens, tokens, dtype, mapped)


def activation_width(args: ModelArgs, name: str) -> int:
    """Values per position of a traced activation: q and scores_v n_heads x head_dim, k and v
    n_kv_heads x head_dim, the logits vocab, the rest dim."""
    op = name.split(".", 2)[-1] if name.startswith("layers.") else name
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    return {"attention.q": q, "attention.scores_v": q, "attention.k": kv, "attention.v": kv,
            "logits": args.vocab_size}.get(op, args.dim)


def model_is_mapped(model) -> bool:
    """Whether a loaded NumPy model's matrices stay in a mapped file (formats/mapped.py)."""
    w = model.layers[0].w1 if getattr(model, "layers", None) else None
    return isinstance(w, QuantizedMatrix) and w.mapped


def weights_in_memory(model) -> int:
    """Bytes of a loaded model's weights held in memory (arrays; GGUF blocks read into memory);
    matrices left in a mapped file count nothing."""
    seen, total = set(), 0
    for w in model.state_dict().values():
        if id(w) in seen:
            continue
        seen.add(id(w))
        if isinstance(w, QuantizedMatrix):
            total += 0 if w.mapped else w.nbytes
        else:
            total += getattr(w, "nbytes", 0)
    return total


def generation_peak_bytes(args: ModelArgs, batch: int, prompt: int, new_tokens: int, dtype=np.float32,
                          mapped: bool = False, weights: int = 0, reused: int = 0) -> int:
    """The peak of generating ``new_tokens`` after a ``prompt``-token prefill for ``batch`` rows:
    the larger of the prefill (cache holding the prompt) and the last decode step (cache holding
    prompt + answer, the prefill's float32 logits still held), plus ``weights`` bytes held.
    reused: the prompt's first positions already in the cache (a chat turn), which the prefill
    does not feed again."""
    fed = max(prompt - min(reused, prompt - 1), 1)
    prefill = kv_cache_bytes(args, batch, prompt, dtype) + forward_bytes(args, batch, fed, prompt, dtype, mapped)
    total = prompt + max(new_tokens - 1, 0)
    decode = (kv_cache_bytes(args, batch, total, dtype, prefill=prompt) + batch * fed * args.vocab_size * 4
              + forward_bytes(args, batch, 1, total, dtype, mapped))
    return weights + max(prefill, decode if new_tokens > 1 else 0)


# ---------------------------------------------------------------------------- the machine
def available_bytes() -> int | None:
    """Memory this process can still take: the smaller of the kernel's MemAvailable
    (/proc/meminfo) and what its cgroup allows beyond what it uses (memory.max - memory.current,
    cgroup v2; v1's limit_in_bytes - usage_in_bytes). None where neither can be read."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, used_file in (("memory.max", "memory.current"),
                                  ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        limit, used = _read_int(_cgroup_file(limit_file)), _read_int(_cgroup_file(used_file))
        if limit is not None and used is not None and limit < 1 << 60:
            found.append(max(0, limit - used))
            break
    return min(found) if found else None


def _cgroup_file(name: str) -> str:
    """/sys/fs/cgroup/<this process's cgroup>/name (v2), or /sys/fs/cgroup/name (v1, or the root)."""
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                parts = line.strip().split(":", 2)
                if len(parts) == 3 and parts[0] == "0" and parts[1] == "":      # the v2 line
                    path = os.path.join("/sys/fs/cgroup", parts[2].lstrip("/"), name)
                    if os.path.exists(path):
                        return path
    except OSError:
        pass
    return os.path.join("/sys/fs/cgroup", name)


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def check_fits(need: int, what: str, fits: str = "", available: int | None = None) -> None:
    """An InputError, before the work starts, when ``need`` bytes (plus RESERVE_BYTES) exceed the
    memory available (available_bytes, or ``available``): one line with the figures, ``what`` the
    work is and ``fits`` what would fit. Nothing when the memory cannot be read."""
    available = available_bytes() if available is None else available
    if available is None or need + RESERVE_BYTES <= available:
        return
    raise InputError(f"{what} needs about {gib(need)} of memory at its peak (and {gib(RESERVE_BYTES)} for Python and "
                     f"its libraries), but {gib(available)} are available (MemAvailable and the cgroup's "
                     f"memory.max){'; ' + fits if fits else ''}")


def fitting_length(args: ModelArgs, batch: int, prompt: int, dtype, mapped: bool, weights: int,
                   available: int) -> int:
    """The most positions (prompt + answer) whose generation fits in ``available`` bytes (0: not even
    the prompt's prefill), found by bisection over generation_peak_bytes."""
    budget = available - RESERVE_BYTES

    def fits(total: int) -> bool:
        return generation_peak_bytes(args, batch, min(prompt, total), max(total - prompt, 0) + 1, dtype,
                                     mapped, weights) <= budget
    if not fits(max(prompt, 1)):
        return 0
    lo, hi = max(prompt, 1), max(prompt, 1)
    window = context_window(args)
    while hi < window and fits(min(2 * hi, window)):
        lo = hi = min(2 * hi, window)
    hi = min(2 * hi, window)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def check_generation_fits(model, batch: int, prompt: int, new_tokens: int, available: int | None = None,
                          reused: int = 0) -> None:
    """Refuse, before the prefill, a generation whose peak would not fit (check_fits), naming the
    KV cache's share and the longest generation that would fit. new_tokens is cut to what the
    context window leaves after the prompt, as generate does; reused as in generation_peak_bytes."""
    args, dtype = model.config, np.dtype(model.dtype)
    new_tokens = min(new_tokens, max(context_window(args) - prompt, 0))
    mapped, weights = model_is_mapped(model), weights_in_memory(model)
    total = prompt + new_tokens
    need = generation_peak_bytes(args, batch, prompt, new_tokens, dtype, mapped, weights, reused)
    available = available_bytes() if available is None else available
    if available is None or need + RESERVE_BYTES <= available:
        return
    cache = kv_cache_bytes(args, batch, total, dtype, prefill=prompt)
    most = fitting_length(args, batch, prompt, dtype, mapped, weights, available)
    fits = (f"at most {most} positions (prompt + new tokens) would fit" if most > prompt else
            "not even the prompt's prefill fits; shorten the prompt" + ("" if mapped else " or load with --mapped"))
    check_fits(need, f"generating {new_tokens} tokens after {prompt} ({total} positions{f' x {batch} rows' * (batch > 1)}; "
                     f"the KV cache alone is {gib(cache)} in {dtype.name})", fits, available)


def check_call_fits(model, what: str, need: int, fits: str = "", available: int | None = None) -> None:
    """check_fits for work of ``need`` bytes beside the weights a loaded model holds in memory."""
    check_fits(need + weights_in_memory(model), what, fits, available)


# ---------------------------------------------------------------------------- batches of prompts
DEFAULT_BATCH_MIB = 1024   # `npllama generate --prompts FILE`: one batch's estimate stays within this


def batch_bytes(args: ModelArgs, batch: int, length: int, dtype=np.float32) -> int:
    """Bytes one generation batch holds at its peak, ``batch`` rows of ``length`` positions each
    (prompt and answer): the KV cache grown to hold them, the prefill's float32 logits, and one
    call's largest moment (forward_bytes). What ``generate --prompts`` plans its batches by
    (npllama.inputs.plan_batches); dtype: a NumPy dtype, or anything with an integer itemsize."""
    return (kv_cache_bytes(args, batch, length, dtype) + batch * length * args.vocab_size * 4
            + forward_bytes(args, batch, length, length, dtype))
