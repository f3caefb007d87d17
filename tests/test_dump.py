"""The dump schema, version 2 (npllama/dump.py): steps, ranks and splits, and version 1 read as it was."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from safetensors.numpy import save_file

from npllama.dump import (IDS, PARTIAL_SUM, REPLICATED, Dump, Step, dump_metadata, gather_ranks, parse_split,
                          parse_step, read_dump, shard, step_name, write_steps)
from npllama.errors import InputError


def test_steps_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    steps = [({"layers.0.ffn_norm": rng.standard_normal((1, 5, 8)).astype(np.float32)}, [[1, 2, 3, 4, 5]]),
             ({"layers.0.ffn_norm": rng.standard_normal((1, 1, 8))}, [[7]]),
             ({"logits": rng.standard_normal((1, 1, 11)).astype(np.float16)}, [[9]])]
    path = write_steps(tmp_path / "d.safetensors", steps, dump_metadata("float32", "test"))
    dump = read_dump(path)
    assert len(dump.steps) == 3 and dump.metadata["schema_version"] == "2" and dump.metadata["steps"] == "3"
    for (acts, ids), step in zip(steps, dump.steps):
        assert step.input_ids.tolist() == ids
        for name, x in acts.items():     # widening to float64 is exact
            assert np.array_equal(step.tensors[name], np.asarray(x, np.float64)) and step.dtypes[name] == str(x.dtype)
    assert dump.tensors is dump.steps[0].tensors and dump.input_ids.tolist() == [[1, 2, 3, 4, 5]]


def test_a_version_1_dump_reads_as_one_step_of_one_rank(tmp_path):
    path = tmp_path / "v1.safetensors"
    save_file({IDS: np.array([[1, 2]], np.int64), "norm": np.ones((1, 2, 4), np.float32)}, str(path),
              metadata={"format": "npllama-trace", "schema_version": "1", "dtype": "float32"})
    dump = read_dump(path)
    assert (len(dump.steps), dump.rank, dump.world_size) == (1, 0, 1)
    assert dump.split_of("norm") == REPLICATED


@pytest.mark.parametrize("meta, words", [
    ({"schema_version": "3"}, "schema version '3'"),
    ({"steps": "²"}, "metadata steps"),
    ({"steps": "99999999"}, "metadata steps"),
    ({"world_size": "2", "rank": "2"}, "metadata rank"),
    ({"splits": "[1, 2]"}, "JSON object"),
    ({"splits": "[" * 100_000 + "]" * 100_000}, "JSON object"),           # nested past Python's recursion
    ({"splits": json.dumps({"attention.q": "shard(x)"})}, "shard(D)"),
    ({"logits_positions": "first"}, "logits_positions"),
])
def test_bad_metadata_is_one_line(tmp_path, meta, words):
    path = tmp_path / "bad.safetensors"
    save_file({IDS: np.array([[1, 2]], np.int64)}, str(path), metadata=meta)
    with pytest.raises(InputError) as e:
        read_dump(path)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_tensor_of_a_step_past_the_count_is_refused(tmp_path):
    path = tmp_path / "d.safetensors"
    save_file({IDS: np.array([[1]], np.int64), "step.2.norm": np.ones((1, 1, 4), np.float32)}, str(path),
              metadata={"steps": "2"})
    with pytest.raises(InputError, match="step 2"):
        read_dump(path)


@given(st.integers(0, 9999), st.sampled_from(["norm", "layers.3.attention.q", IDS, "step.x.y"]))
def test_step_names_parse_back(step, name):
    assert parse_step(step_name(step, name)) == (step, name)


def test_splits_parse():
    assert parse_split("shard(1)", "x") == shard(1) and str(shard(1)) == "shard(1)"
    assert parse_split("partial-sum", "x") == PARTIAL_SUM
    for bad in ("shard(-1)", "shard(١)", "sum", "shard(10)"):
        with pytest.raises(InputError):
            parse_split(bad, "x")


def rank_dumps(whole: dict[str, np.ndarray], world: int, splits: dict[str, str]) -> list[Dump]:
    """Cut whole tensors into world ranks' dumps by their splits (what a sharded port writes)."""
    dumps = []
    for r in range(world):
        tensors = {}
        for name, x in whole.items():
            split = parse_split(splits.get(name.split(".", 2)[-1] if name.startswith("layers.") else name,
                                           "replicated"), name)
            if split.kind == "shard":
                tensors[name] = np.split(x, world, axis=split.axis)[r]
            elif split.kind == "partial-sum":
                tensors[name] = x / world
            else:
                tensors[name] = x
        meta = dump_metadata("float64", "test", rank=r, world_size=world, splits=splits)
        dumps.append(Dump(f"d.rank{r}", [Step(tensors, {n: "float64" for n in tensors}, np.array([[1, 2]]))],
                          meta, r, world, {k: parse_split(v, k) for k, v in splits.items()}))
    return dumps


@settings(max_examples=20, deadline=None)
@given(st.sampled_from([1, 2, 3]), st.integers(0, 2**32 - 1))
def test_gathering_ranks_rebuilds_the_whole_tensors(world, seed):
    rng = np.random.default_rng(seed)
    whole = {"layers.0.attention.q": rng.standard_normal((1, 6, 2, 4)),        # heads sharded
             "layers.0.attention": rng.standard_normal((1, 2, 8)),             # wo's partial sums
             "layers.0.ffn_residual": rng.standard_normal((1, 2, 8))}          # replicated
    splits = {"attention.q": "shard(1)", "attention": "partial-sum"}
    gathered = gather_ranks(rank_dumps(whole, world, splits))
    for name, x in whole.items():
        assert np.allclose(gathered.tensors[name], x, rtol=1e-15, atol=0)
    if world > 1:
        assert len(gathered.pieces[(0, "layers.0.attention.q")]) == world


def test_gathering_needs_every_rank_once():
    whole = {"norm": np.ones((1, 2, 4))}
    dumps = rank_dumps(whole, 3, {})
    with pytest.raises(InputError, match="one dump per rank"):
        gather_ranks(dumps[:2])
    with pytest.raises(InputError, match="one dump per rank"):
        gather_ranks([dumps[0], dumps[0], dumps[2]])
