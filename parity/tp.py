"""Tensor parallelism: one model split over the ranks of a torch.distributed process group.

Megatron-LM's split (Shoeybi et al. 2019, "Megatron-LM", section 3), applied after loading as
gpt-fast's tp.py applies it. Each rank holds whole heads and a slice of the SwiGLU width; the
projections that read the residual stream are split by their output rows ("column-parallel"),
the two that write it back by their input columns ("row-parallel"), and one all-reduce after each
of those completes the sum:

                 x (batch, seq, dim): the same on every rank
        ┌────────────────┬───────┴────────┬────────────────┐
        │ rank 0         │ rank 1         │ rank 2         │   wq, wk, wv: rows of heads
        │ q heads 0-2    │ q heads 3-5    │ q heads 6-8    │   (column-parallel, no talk)
        │ kv head 0      │ kv head 1      │ kv head 2      │   the KV cache: these heads only
        │ attention      │ attention      │ attention      │
        │ wo[:, cols 0]  │ wo[:, cols 1]  │ wo[:, cols 2]  │   wo: columns of those heads
        └───── partial ──┴─── partial ────┴── partial ────┘   (row-parallel)
                    all-reduce (sum) ──> attention (batch, seq, dim) on every rank
        the same for the MLP: w1, w3 rows of hidden_dim / N, w2 its columns, one all-reduce

Everything else (the embedding, the norms, the LM head) is replicated: every rank holds the whole
table and computes the whole logits, so each rank holds the same logits without a gather and
samples the same token from them (docs/tensor_parallel.md says why not vocab-parallel).

So each rank's model is an ordinary parity.Transformer of a smaller config, ``rank_config``:
n_heads / N query heads, n_kv_heads / N key/value heads, hidden_dim / N; parity/model.py's
forward runs unchanged on it. The one difference is the weight of wo and w2: a ``RowParallel``
module, whose product (parity.mlp.linear calls ``weight.linear(x, bias)``, the seam the
quantized kernels use) ends in the all-reduce.

Why not ``torch.distributed.tensor.parallel.parallelize_module`` with ColwiseParallel and
RowwiseParallel: those styles (1) take nn.Linear modules and install their re-layouts as forward
hooks on the module's call, where parity/model.py, the mirror of the NumPy spec, calls
``linear(x, a.wq.weight, ...)`` on weights and never calls a projection module; (2) distribute a
whole weight that every rank already holds (distribute_tensor), where here each rank reads only its
own slices; (3) leave DTensor weights that cannot meet the plain activations of the functional
forward in F.linear without ``.to_local()`` at every use. What remains of them is the reduction
after wo and w2, which is one ``torch.distributed.all_reduce`` (RowwiseParallel's own output step,
a Partial -> Replicate redistribution, costs more per call on a CPU: bench/bench_tp.py).

    model = parity.load(path, tp=2)            # inside a process group of 2 (torchrun, or yours)
    torchrun --nproc-per-node 3 -m npllama generate --backend torch --tp 3 -p "Hello"
    npllama generate --backend torch --tp 3 -p "Hello"       # starts the 3 processes itself
    npllama parity --tp 3                      # the split model against the reference, op by op
"""

from __future__ import annotations

import math
import os
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from npllama.checks import is_int
from npllama.config import ModelArgs
from npllama.dump import REPLICATED, Dump, Split, Step, shard
from npllama.errors import CheckpointError, ConfigError, InputError
from npllama.model import stream_names
from npllama.quant.matrix import WEIGHTS_PER_PIECE, QuantizedMatrix
from npllama.report import Report, Row, in_forward_order, split_name

from .model import Transformer

# ---------------------------------------------------------------------------- the split
COLUMN_PARALLEL = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3")
ROW_PARALLEL = ("attention.wo", "feed_forward.w2")

# How each traced activation of a rank relates to the whole (npllama.dump's splits): the heads
# axis of q, k, v and softmax(qk)v is split; wo's and w2's outputs are traced after their
# all-reduce, so they and everything else are whole on every rank.
SPLITS: dict[str, Split] = {"attention.q": shard(1), "attention.k": shard(1), "attention.v": shard(1),
                            "attention.scores_v": shard(1)}


def sizes_that_work(args: ModelArgs) -> list[int]:
    """Every number of ranks that splits the model into whole heads and equal MLP slices: the
    divisors of gcd(n_kv_heads, hidden_dim) (n_heads is a multiple of n_kv_heads)."""
    g = math.gcd(args.n_kv_heads, args.hidden_dim)
    return [n for n in range(1, g + 1) if g % n == 0]


def check_tp(args: ModelArgs, n: int, where: str = "") -> None:
    """An InputError, in one line naming the sizes that would work, unless n ranks split the model."""
    if not is_int(n) or n < 1:
        raise InputError(f"tp must be a whole number of ranks >= 1, got {n!r}")
    works = sizes_that_work(args)
    if n in works:
        return
    alts = ", ".join(f"tp={k}" for k in works[:-1]) + (" or " if len(works) > 1 else "") + f"tp={works[-1]}"
    what = (f"its {args.n_kv_heads} key/value heads ({args.n_heads} query heads) do not divide into {n} ranks of "
            f"whole heads" if args.n_kv_heads % n else f"its SwiGLU width {args.hidden_dim} does not divide by {n}")
    raise InputError(f"{where}{': ' if where else ''}tp={n} does not split this model: {what}; {alts} would")


def rank_config(args: ModelArgs, n: int) -> ModelArgs:
    """The config of one rank's part: n_heads / n, n_kv_heads / n, hidden_dim / n; head_dim kept."""
    check_tp(args, n)
    return args.replace(n_heads=args.n_heads // n, n_kv_heads=args.n_kv_heads // n,
                        hidden_dim=args.hidden_dim // n, head_dim=args.head_dim)


def param_split(name: str) -> Split:
    """How a rank's copy of a checkpoint tensor relates to the whole: shard(0) (rows of wq, wk, wv,
    w1, w3 and their biases), shard(1) (columns of wo and w2), or replicated (the rest, the
    biases of wo and w2 included: they are added once, after the sum)."""
    module, _, kind = name.rpartition(".")
    op = module.split(".", 2)[-1] if module.startswith("layers.") else module
    if op in COLUMN_PARALLEL:
        return shard(0)
    if op in ROW_PARALLEL and kind == "weight":
        return shard(1)
    return REPLICATED


def shard_slice(name: str, shape: Sequence[int], rank: int, n: int) -> tuple[slice, ...] | None:
    """The index of rank's slice of a tensor of this name and whole shape (None: the whole)."""
    split = param_split(name)
    if split.kind != "shard" or n == 1:
        return None
    size = shape[split.axis] // n
    return (slice(None),) * split.axis + (slice(rank * size, (rank + 1) * size),)


def shard_params(params: Mapping[str, Any], rank: int, n: int) -> dict[str, Any]:
    """Rank's slices of a whole state dict (arrays or tensors, views where they allow; a matrix
    left in its file, a QuantizedMatrix, made float a block of rows at a time: quantized_slice)."""
    out = {}
    for name, a in params.items():
        index = shard_slice(name, a.shape, rank, n)
        out[name] = a if index is None else quantized_slice(a, index) if isinstance(a, QuantizedMatrix) else a[index]
    return out


def quantized_slice(w: QuantizedMatrix, index: tuple[slice, ...]) -> np.ndarray:
    """w[index] as a float array, for a (out, in) matrix kept as stored (a mapped file's or GGUF
    blocks): its rows dequantized WEIGHTS_PER_PIECE weights at a time, each block's columns kept,
    so that a rank never holds more of the whole matrix in float than one block of rows."""
    rows = np.arange(w.n_out)[index[0]]
    cols = index[1] if len(index) > 1 else slice(None)
    step = max(1, WEIGHTS_PER_PIECE // max(w.n_in, 1))
    return np.concatenate([w[rows[i:i + step]][:, cols] for i in range(0, len(rows), step)])


# ---------------------------------------------------------------------------- the row-parallel product
class RowParallel(nn.Module):
    """The weight of wo or w2 on one rank: its columns, (out, in / N), and the all-reduce that
    completes the product, so that every rank gets x @ W.T + b of the whole W.

    x: (..., in / N), this rank's heads or hidden slice -> (..., out), the same on every rank.
    The bias (replicated) is added once, after the sum.
    """

    def __init__(self, shard: torch.Tensor, group=None):
        super().__init__()
        self.shard = nn.Parameter(shard, requires_grad=False)
        self.group = group

    @property
    def shape(self) -> torch.Size:
        return self.shard.shape

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = F.linear(x, self.shard)                          # (..., out): this rank's partial sum
        dist.all_reduce(y, group=self.group)                  # the whole sum, on every rank
        return y if bias is None else y + bias


def fast_weights(model: Transformer, layout: str = "auto"):
    """One rank's weights for the fast path (parity.fast.FastDecoder): wq|wk|wv and w1|w3 fused
    after the split, per rank, as gpt-fast's tp.py does (a column split of a fused wqkv would give
    rank 0 all of q); wo and w2 stay RowParallel, so the fast step's products end in the same
    all-reduces. model: a rank's model (build / load)."""
    from types import SimpleNamespace

    from .fast import FastWeights
    sd = {name.replace(".weight.shard", ".weight"): t for name, t in model.state_dict().items()}
    view = SimpleNamespace(config=model.config, tokenizer=model.tokenizer, source=model.source,
                           weights="float32", state_dict=lambda: sd)
    weights = FastWeights(view, layout)
    for block, layer in zip(weights.layers, model.layers):
        for attr, projection in (("wo", layer.attention.wo), ("w2", layer.feed_forward.w2)):
            if isinstance(projection.weight, RowParallel):
                delattr(block, attr)
                setattr(block, attr, projection.weight)
    weights.parallel = model.parallel
    return weights


@dataclass(frozen=True)
class Parallel:
    """Where a rank's model sits: its rank and the group's size, the group, the whole model's config."""
    rank: int
    world_size: int
    group: Any
    whole: ModelArgs


def build(args: ModelArgs, params: Mapping[str, Any], tokenizer=None, *, rank: int, world_size: int,
          group=None, dtype: torch.dtype = torch.float32, device=None, source: str = "checkpoint") -> Transformer:
    """One rank's model from its slices of the weights (shard_params' names and shapes).

    args: the whole model's config. The result is a parity.Transformer of rank_config(args) whose
    wo and w2 weights are RowParallel; ``model.parallel`` says which rank it is.
    """
    local = rank_config(args, world_size)
    model = Transformer(local, params, tokenizer, dtype=dtype, device=device, source=source)
    if world_size > 1:
        row_parallel(model, group)
    model.parallel = Parallel(rank, world_size, group, args)
    model.weights = "float32"
    return model


def row_parallel(model: Transformer, group=None) -> Transformer:
    """Make every layer's wo and w2 weight (this rank's columns) RowParallel: its product ends in
    the all-reduce over group. build does it for more than one rank (alone, the sum is the
    product itself; bench/bench_gpu.py wraps them anyway, to time NCCL at world size 1)."""
    for layer in model.layers:
        for projection in (layer.attention.wo, layer.feed_forward.w2):
            w = projection.weight.detach()
            del projection.weight
            projection.weight = RowParallel(w, group)
    return model


def from_numpy(model, group=None, device=None, dtype=torch.float32) -> Transformer:
    """This rank's part of a loaded npllama.Transformer (its slices copied; nothing read again)."""
    from . import resolve_device, resolve_dtype
    rank, n = group_rank(group)
    check_tp(model.config, n)
    params = shard_params(model.state_dict(), rank, n)
    return build(model.config, params, model.tokenizer, rank=rank, world_size=n, group=group,
                 dtype=resolve_dtype(dtype), device=rank_device(resolve_device(device)), source=model.source)


# ---------------------------------------------------------------------------- reading a rank's slices
def peek_args(path) -> ModelArgs:
    """A checkpoint's config, read without its weights (for refusing a split before any process
    starts): config.json, params.json, or a GGUF file's header."""
    from npllama.formats import detect_format
    from npllama.formats.fields import build_args

    fmt, where = detect_format(_checkpoint(path))
    if fmt == "hf":
        from npllama.formats.hf import args_from_config, check_model_type, read_json
        cfg = read_json(where / "config.json")
        check_model_type(cfg, where / "config.json")
        return build_args(args_from_config, where / "config.json", cfg, str(where / "config.json"))
    if fmt == "meta":
        from npllama.formats.meta import args_from_params, read_json
        return build_args(args_from_params, where / "params.json", read_json(where / "params.json"),
                          vocab_size=1, source=str(where / "params.json"))
    from npllama.formats.gguf import args_from_metadata, open_gguf, read_metadata
    reader = open_gguf(where)
    tensors = {t.name: t for t in reader.tensors}
    embd = tensors.get("token_embd.weight")
    vocab = int(embd.shape[-1]) if embd is not None else 1
    return build_args(args_from_metadata, where, read_metadata(reader, where), vocab_size=vocab,
                      tied="output.weight" not in tensors, source=str(where))


def _checkpoint(path) -> Path:
    """The local file or folder of a model path: the default model, a path, or a Hub id's snapshot."""
    from npllama.formats import resolve
    return resolve(path)


def load_slices(path, rank: int, n: int, progress: bool = True):
    """(whole config, rank's slices in npllama's names, tokenizer, source) of a checkpoint.

    A Hugging Face folder of safetensors is read slice by slice (safetensors' get_slice over the
    memory-mapped file: a rank reads only its rows and columns). Other formats (GGUF, Meta's
    .pth, pytorch_model.bin) are loaded by npllama.load and sliced after: the rank reads the whole
    file once, and keeps its slices (a large model stays mapped meanwhile, each matrix made float
    a block of rows at a time: quantized_slice).
    """
    from npllama.formats import detect_format
    from npllama.formats.hf import weight_files

    fmt, where = detect_format(_checkpoint(path))
    if fmt == "hf" and all(f.suffix == ".safetensors" for f in weight_files(where)):
        return _hf_slices(where, rank, n, progress)
    import npllama
    base = npllama.load(where, progress=progress)
    check_tp(base.config, n, str(where))
    params = {k: np.ascontiguousarray(v) for k, v in shard_params(base.state_dict(), rank, n).items()}
    return base.config, params, base.tokenizer, base.source


def _hf_slices(folder: Path, rank: int, n: int, progress: bool):
    """load_hf's reading (npllama.formats.hf), one rank's slices at a time."""
    from safetensors import safe_open

    from npllama.formats import check_finite
    from npllama.formats.fields import build_args
    from npllama.formats.hf import (args_from_config, check_model_type, hf_tokenizer, read_json,
                                    read_safetensors_header, shard_tensor_name, weight_files)
    from npllama.params import check_params
    from npllama.rope_scaling import rope_init

    cfg = read_json(folder / "config.json")
    check_model_type(cfg, folder / "config.json")
    args = build_args(args_from_config, folder / "config.json", cfg, str(folder / "config.json"))
    check_tp(args, n, str(folder))
    gen = read_json(folder / "generation_config.json", required=False) or {}
    tokenizer = hf_tokenizer(folder, cfg, gen if isinstance(gen, dict) else {})
    if tokenizer is not None:
        args = args.replace(bos_token_id=tokenizer.bos_id if tokenizer.bos_id is not None else args.bos_token_id,
                            eos_token_ids=tokenizer.eos_ids or args.eos_token_ids)
    params, shapes = {}, {}
    for file in weight_files(folder):
        header, _ = read_safetensors_header(file)           # every offset checked against the file's size
        try:
            with safe_open(str(file), framework="pt") as f:
                names = list(f.keys())
                if progress:
                    from npllama.formats import _progress_bar
                    names = _progress_bar(names, desc=f"Rank {rank}: {file.name}")
                for hf_name in names:
                    name = shard_tensor_name(file, hf_name, params)
                    if name is None:
                        continue
                    if header[hf_name]["dtype"] not in ("F32", "F16", "BF16", "F64"):
                        raise CheckpointError(f"{file}: tensor {hf_name!r} is {header[hf_name]['dtype']}; weights "
                                              f"must be F32, F16, BF16 or F64")
                    piece = f.get_slice(hf_name)
                    shapes[name] = tuple(piece.get_shape())
                    index = shard_slice(name, shapes[name], rank, n)
                    params[name] = piece[index] if index is not None else piece[:]
        except CheckpointError:
            raise
        except Exception as e:        # safetensors raises its own errors on corrupt files
            raise CheckpointError(f"{file}: cannot read tensors ({type(e).__name__}: {e})") from None
    if args.tie_word_embeddings:
        params.pop("output.weight", None)
        shapes.pop("output.weight", None)
    check_params(args, {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}, str(folder))
    check_finite({k: v.float().numpy() for k, v in params.items()}, folder)
    if tokenizer is not None and tokenizer.vocab_size > args.vocab_size:
        raise CheckpointError(f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens but the model embeds "
                              f"only {args.vocab_size}; the tokenizer belongs to another model")
    try:
        rope_init(args, 1)
    except ConfigError as e:
        raise ConfigError(f"{folder}: {e}") from None
    return args, params, tokenizer, str(folder)


def load(path=None, tp: int | None = None, device=None, dtype=torch.float32, group=None, progress: bool = True,
         requires_grad: bool = False, weights: str = "float32") -> Transformer:
    """This rank's part of a checkpoint, inside a process group of tp ranks (parity.load(tp=)).

    group: the process group (default: the whole world, as torchrun or init_process_group made it).
    """
    from . import resolve_device, resolve_dtype
    if weights != "float32":
        raise InputError(f"tp with weights={weights!r}: the split model computes with float weights only "
                         f"(weights='float32'); quantized kernels run on one device")
    if requires_grad:
        raise InputError("tp with requires_grad=True: the split model is for inference (train on one device)")
    dtype, device = resolve_dtype(dtype), resolve_device(device)
    rank, n = group_rank(group)
    if tp is not None and tp != n:
        raise InputError(f"tp={tp}, but the process group has {n} rank{'s' * (n != 1)}; start {tp} processes "
                         f"(torchrun --nproc-per-node {tp}) or pass tp={n}")
    args, params, tokenizer, source = load_slices(path, rank, n, progress=progress and rank == 0)
    return build(args, params, tokenizer, rank=rank, world_size=n, group=group, dtype=dtype,
                 device=rank_device(device), source=source)


# ---------------------------------------------------------------------------- process groups
def group_rank(group=None) -> tuple[int, int]:
    """(this process's rank in group, the group's size); an InputError outside any process group."""
    if not dist.is_available() or not dist.is_initialized():
        raise InputError("tensor parallelism runs inside a torch.distributed process group: start the processes "
                         "with torchrun --nproc-per-node N (or call torch.distributed.init_process_group); "
                         "`npllama generate --tp N` starts them itself")
    return dist.get_rank(group), dist.get_world_size(group)


def rank_device(device: torch.device) -> torch.device:
    """A CUDA device without an index, as this rank's GPU: LOCAL_RANK's, when there are enough."""
    if device.type != "cuda" or device.index is not None:
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return torch.device("cuda", local % max(1, torch.cuda.device_count()))


def comm_backend(device: torch.device, ranks_here: int) -> str:
    """gloo on CPUs; NCCL on GPUs, one rank per GPU (NCCL refuses two ranks on one device: then gloo)."""
    if device.type == "cuda" and torch.cuda.device_count() >= ranks_here:
        return "nccl"
    return "gloo"


def launched() -> bool:
    """True inside a process group, or in a process a launcher started as one rank (torchrun's env)."""
    return (dist.is_available() and dist.is_initialized()) or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def join(tp: int, device: torch.device) -> int:
    """Join the process group of a launched rank (torchrun's environment, or one already made);
    returns this process's rank. Each rank computes with 1/N of the CPU's cores."""
    if not dist.is_initialized():
        n = int(os.environ["WORLD_SIZE"])
        if n != tp:
            raise InputError(f"--tp {tp}, but the launcher started {n} process{'es' * (n != 1)}; "
                             f"give torchrun --nproc-per-node {tp}, or --tp {n}")
        local = int(os.environ.get("LOCAL_WORLD_SIZE", n))
        backend = comm_backend(device, local)
        kwargs = {"device_id": rank_device(device)} if backend == "nccl" else {}
        dist.init_process_group(backend, **kwargs)
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    if not _at_exit:
        import atexit
        atexit.register(_leave)
        _at_exit.append(True)
    rank, n = group_rank()
    if n != tp:
        raise InputError(f"--tp {tp}, but the process group has {n} ranks")
    return rank


def command_rank(tp: int, device: torch.device, path, command: str, weights: str = "float32") -> int:
    """This process's rank for a command run with --tp (``npllama generate``, ``npllama parity``).

    Under torchrun, or inside a process group already made: join it. From a plain command line:
    check that the checkpoint splits (its config only), start tp local processes that run the
    command line again, wait for them and exit with their status (this process computes nothing).
    --tp 1 makes a group of one in this process. Ranks other than 0 print nothing on stdout.
    """
    if weights != "float32":
        raise InputError(f"--tp with --weights {weights}: the split model computes with float weights only; "
                         f"quantized kernels run on one device")
    if not launched():
        check_tp(peek_args(path), tp, str(_checkpoint(path)))
        if tp > 1:
            sys.exit(launch(tp, command_line(command)))
        dist.init_process_group(comm_backend(device, 1), init_method=f"tcp://127.0.0.1:{free_port()}",
                                rank=0, world_size=1)
    rank = join(tp, device)
    quiet_unless_first(rank)
    return rank


_at_exit: list = []


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def quiet_unless_first(rank: int) -> None:
    """Ranks other than 0 compute but do not print: their stdout goes to /dev/null."""
    if rank != 0:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)


def command_line(ctx_name: str) -> list[str]:
    """The arguments this command was started with, for the ranks to run again; an InputError when
    the command did not come from a command line (then it cannot be re-run)."""
    argv = sys.argv[1:]
    if ctx_name not in argv or not any(a == "--tp" or a.startswith("--tp=") for a in argv):
        raise InputError("--tp starts its processes by running this command line again, but the command "
                         "was not started from one; run it from a shell, or under torchrun")
    return argv


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(n: int, argv: list[str]) -> int:
    """Run ``npllama ARGV`` as n local processes in one process group (as torchrun would), wait for
    them, and return the exit status: rank 0's, or that of the first rank that failed.

    Rank 0 prints (its stdout and stderr are this process's); the others are silent, and what a
    failing one wrote to stderr is shown, prefixed with its rank. When one rank fails, the others
    get a few seconds to finish, then are stopped (a rank left alone would wait for its peers).
    """
    import torch.multiprocessing as mp

    spawn = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="npllama-tp-") as logs:
        errs = [os.path.join(logs, f"rank{r}.err") for r in range(n)]
        procs = [spawn.Process(target=_rank_main, args=(r, n, port, argv, errs[r]), daemon=False) for r in range(n)]
        for p in procs:
            p.start()
        failed = _wait(procs)
        if failed is None:
            return procs[0].exitcode or 0
        code = procs[failed].exitcode
        if failed != 0:
            tail = Path(errs[failed]).read_text(errors="replace").strip().splitlines() if os.path.exists(errs[failed]) else []
            what = tail[-1] if tail else f"exit status {code}"
            print(f"npllama: error: rank {failed} of {n}: {what}", file=sys.stderr)
        return code if code and code > 0 else 1


def _wait(procs, grace: float = 5.0) -> int | None:
    """Wait for every process; the index of the one whose failure to report (None: all exited 0):
    rank 0 when it failed (it has said why), else the first to fail. After a failure the rest get
    ``grace`` seconds to end, then are terminated."""
    from multiprocessing.connection import wait

    pending = {p.sentinel: i for i, p in enumerate(procs)}
    ended, deadline = [], None
    while pending:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready = wait(list(pending), timeout)
        if not ready:
            break
        for s in ready:
            i = pending.pop(s)
            procs[i].join()
            ended.append(i)
            if procs[i].exitcode != 0 and deadline is None:
                deadline = time.monotonic() + grace
    for i in pending.values():
        procs[i].terminate()
        procs[i].join()
    failed = [i for i in ended if procs[i].exitcode != 0]
    if not failed:
        return None
    return 0 if 0 in failed else failed[0]


def _rank_main(rank: int, n: int, port: int, argv: list[str], err_path: str) -> None:
    """One rank of launch(): the environment torchrun would give it, then the command line again."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(n),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(n))
    if rank != 0:
        quiet_unless_first(rank)
        err = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(err, 2)
        os.close(err)
    from npllama.cli import main
    main(args=argv, prog_name="npllama")


# ---------------------------------------------------------------------------- ranks kept for many calls
class LocalRanks:
    """n processes on this machine in one process group, kept for many calls (tests, benches).

        with LocalRanks(3) as ranks:
            results = ranks.run(fn, arg)          # fn(arg) on every rank, results in rank order
            results = ranks.run(fn, arg, ranks=2) # on ranks 0 and 1 only, whose group is first_ranks(2)

    fn must be importable by name (a module-level function). backend: "gloo" (CPU, and CUDA tensors
    through the host) or "nccl". Every call waits at most ``timeout`` seconds; a rank that fails
    or hangs stops every rank and raises here, with the rank's traceback. start_method: "spawn"
    (fresh interpreters, safe with CUDA) or "fork" (a CPU-only caller's copies: they start in a
    fraction of the time, with what the caller has imported).
    """

    def __init__(self, n: int, backend: str = "gloo", timeout: float = 300.0, threads: int | None = None,
                 start_method: str = "spawn"):
        import torch.multiprocessing as mp

        if start_method == "fork" and dist.is_available() and dist.is_initialized():
            raise RuntimeError("this process already has a process group, and forked ranks would inherit it: "
                               "call torch.distributed.destroy_process_group() first, or start the ranks "
                               "with start_method='spawn'")
        self.n, self.timeout = n, timeout
        spawn = mp.get_context(start_method)
        port = free_port()
        self.pipes, self.procs = [], []
        for r in range(n):
            here, there = spawn.Pipe()
            p = spawn.Process(target=_worker, args=(r, n, port, backend, threads, there), daemon=True)
            p.start()
            self.pipes.append(here)
            self.procs.append(p)
        self._collect(range(n), timeout)        # every rank joined the group

    def run(self, fn: Callable, *args, ranks: int | None = None, timeout: float | None = None) -> list:
        k = self.n if ranks is None else ranks
        for r in range(k):
            self.pipes[r].send((fn, args))
        return self._collect(range(k), timeout or self.timeout)

    def _collect(self, ranks, timeout: float) -> list:
        from multiprocessing.connection import wait

        deadline = time.monotonic() + timeout
        out: dict[int, Any] = {}
        waiting = {self.pipes[r]: r for r in ranks}
        while waiting:
            ready = wait(list(waiting) + [self.procs[r].sentinel for r in waiting.values()],
                         max(0.0, deadline - time.monotonic()))
            if not ready:
                self.close()
                raise TimeoutError(f"ranks {sorted(waiting.values())} did not answer within {timeout:.0f} s")
            for conn in [c for c in ready if c in waiting]:
                r = waiting.pop(conn)
                status, value = conn.recv()
                if status == "error":
                    self.close()
                    raise RuntimeError(f"rank {r} failed:\n{value}")
                out[r] = value
            dead = [r for r in waiting.values() if not self.procs[r].is_alive()]
            if dead:
                self.close()
                raise RuntimeError(f"rank {dead[0]} died (exit status {self.procs[dead[0]].exitcode})")
        return [out[r] for r in ranks]

    def close(self) -> None:
        for conn, p in zip(self.pipes, self.procs):
            if p.is_alive():
                try:
                    conn.send(None)
                except (OSError, BrokenPipeError):
                    pass
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()

    def __enter__(self) -> "LocalRanks":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_FIRST: dict[int, Any] = {}


def first_ranks(k: int):
    """In a LocalRanks worker: the process group of ranks 0..k-1 (None: the whole world)."""
    return _FIRST.get(k)


def _worker(rank: int, n: int, port: int, backend: str, threads: int | None, conn) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(n),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(n))
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // n))
    try:
        dist.init_process_group(backend)
        for k in range(1, n):                  # made by every rank, in the same order
            _FIRST[k] = dist.new_group(list(range(k)))
        conn.send(("ok", rank))
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        try:
            job = conn.recv()
        except EOFError:
            break
        if job is None:
            break
        fn, args = job
        try:
            conn.send(("ok", fn(*args)))
        except BaseException:
            conn.send(("error", traceback.format_exc()))
    conn.close()
    os._exit(0)          # no destroy_process_group: it waits on the peers, which are leaving too


# ---------------------------------------------------------------------------- activations across ranks
def capture_rank(model, ids, attention: str = "auto", given=None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """This rank's traced activations (float64 NumPy; q, k, v and scores_v of its heads only)."""
    from .report import capture, capture_isolated
    if given is not None:
        return capture_isolated(model, ids, given, attention)
    return capture(model, ids, attention=attention)


def rank_dumps(traces: Sequence[tuple[dict[str, np.ndarray], dict[str, str]]], ids: np.ndarray,
               dtype: str) -> list[Dump]:
    """Each rank's trace as the dump it would write (npllama.dump: rank, world size, SPLITS)."""
    n = len(traces)
    return [Dump(f"rank {r}", [Step(dict(t), dict(d), np.asarray(ids))], {"dtype": dtype}, r, n, dict(SPLITS))
            for r, (t, d) in enumerate(traces)]


def rank_rows(pieces: Mapping[str, Sequence[np.ndarray]], split_of: Callable[[str], Split],
              reference: Mapping[str, np.ndarray], rtol: Callable[[str], float]) -> list[tuple[Row, list[int]]]:
    """Each traced name checked rank by rank: its row (the worst rank's errors, each against the
    whole tensor's scale) and the ranks whose piece is over the tolerance.

    pieces: name -> [rank 0's, rank 1's, ...]. A replicated name is checked on every rank's copy,
    not only rank 0's: a rank whose copy differs (a dropped all-reduce) is named.
    """
    out = []
    for name, ref in in_forward_order(dict(reference)).items():
        if name not in pieces:
            continue
        parts, split = pieces[name], split_of(name)
        scale = float(np.max(np.abs(ref), initial=0.0))
        worst, bad = (0.0, 0.0), []
        wants = split.cut(ref, [p.shape for p in parts])       # None: a partial sum, checked as the sum
        checks = [(None, None)] if wants is None else list(enumerate(wants))
        for r, want in checks:
            got = np.sum(parts, axis=0) if r is None else parts[r]
            want = ref if r is None else want
            if got.shape != want.shape:
                raise InputError(f"{name}: rank {r}'s piece has shape {got.shape}, expected {want.shape}")
            diff = float(np.max(np.abs(got - want), initial=0.0))
            rel = diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
            rel = math.inf if math.isnan(diff) else rel
            if rel > worst[1] or math.isnan(rel):
                worst = (diff, rel)
            if not rel <= rtol(name):
                bad.extend([] if r is None else [r])
        layer, op = split_name(name)
        out.append((Row(name, layer, op, worst[0], worst[1], rtol(name)), bad))
    return out


def first_rank_break(pieces: Mapping[str, Sequence[np.ndarray]], split_of: Callable[[str], Split],
                     reference: Mapping[str, np.ndarray], rtol: Callable[[str], float]) -> tuple[str, list[int]] | None:
    """The first name, in forward order, where some rank's piece departs, and those ranks."""
    for row, bad in rank_rows(pieces, split_of, reference, rtol):
        if not row.ok:
            return row.name, bad
    return None


def describe_break(name: str, ranks: list[int], world_size: int, split: Split) -> str:
    """One line naming where a split run parts from the reference, and on which ranks."""
    layer, op = split_name(name)
    where = f"layer {layer} op {op}" if layer is not None else f"op {op}"
    if not ranks:
        return f"{where}: the sum over the ranks' partial sums departs (a partial sum names no rank)"
    def named(rs: list[int]) -> str:
        return f"rank {rs[0]}" if len(rs) == 1 else f"ranks {', '.join(map(str, rs))}"
    part = "its copy" if split.kind == "replicated" else f"its shard (axis {split.axis})"
    others = [r for r in range(world_size) if r not in ranks]
    agree = f"; {named(others)} agree{'s' * (len(others) == 1)}" if others else ""
    return f"{where} parts on {named(ranks)} of {world_size}: {part} departs from the reference{agree}"


def parity_report(model, ids, attention: str = "auto", base=None, isolate: bool = False) -> Report | None:
    """The split model against npllama in float64, op by op, on activations gathered across ranks.

    Every rank calls this (it is collective); rank 0 returns the Report, the others None.
    base: on rank 0, the npllama model of the same checkpoint (the reference holds its weights
    rounded to the model's dtype: exactly each rank's slices, read back). isolate: every layer runs
    from the reference's input to it (the reference's residual stream, sent to every rank), held
    to the "layer" tolerance. Each row is the worst rank's; a note names the rank where it parts.
    """
    from npllama.oracle import reference_model, trace
    from npllama.tolerances import dtype_name, parity_rtol

    info = model.parallel
    rank, n, group = info.rank, info.world_size, info.group
    dt = dtype_name(model.dtype)
    ref = stream = None
    if rank == 0:
        if base is None:
            raise InputError("parity_report needs the npllama model (base) on rank 0")
        reference = reference_model(base, dt)
        ids = reference.check_ids(ids)
        ref = {k: np.asarray(v, dtype=np.float64) for k, v in trace(reference, ids).items()}
        if isolate:
            stream = {k: ref[k] for k in stream_names(info.whole.n_layers)}
    box = [ids, stream]
    dist.broadcast_object_list(box, src=_global_rank(0, group), group=group)
    ids, stream = box
    traced = capture_rank(model, ids, attention, stream)
    gathered = [None] * n if rank == 0 else None
    dist.gather_object(traced, gathered, dst=_global_rank(0, group), group=group)
    if rank != 0:
        return None
    dumps = rank_dumps(gathered, ids, dt)
    pieces = {name: [d.tensors[name] for d in dumps] for name in dumps[0].tensors}
    kind = "layer" if isolate else "model"
    rows = rank_rows(pieces, dumps[0].split_of, ref, lambda name: parity_rtol(dt, kind, dumps[0].dtypes[name]))
    title = (f"tensor parallel, {n} rank{'s' * (n != 1)} ({dist.get_backend(group)}), {attention} attention, {dt} on "
             f"{model.device}{', each layer from the reference input' if isolate else ', end to end'} "
             f"vs npllama float64")
    report = Report(title, [r for r, _ in rows], dt, str(model.device))
    first = next(((r, bad) for r, bad in rows if not r.ok), None)
    if first is not None:
        report.notes.append(describe_break(first[0].name, first[1], n, dumps[0].split_of(first[0].name)))
    return report


def _global_rank(group_rank: int, group) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)
