"""The layout of the code itself: the spec is NumPy alone, arrows run one way, knowledge lives once.

These read the source (ast, not grep) and run the command line in a process where torch cannot be
imported, the way a NumPy-only install sees npllama.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from npllama.cli import main
from npllama.config import ModelArgs
from npllama.layout import FUSED, fuse_params, split_params
from npllama.model import Transformer, trace_names
from npllama.params import init_params

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "npllama"


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports inside functions included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def spec_files() -> list[Path]:
    return sorted(SPEC.rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def spec_graph() -> dict[str, set[str]]:
    """npllama's own import graph: module -> the npllama modules it names in an import, at any depth
    (lazy imports included; relative imports resolved; the parent packages Python imports on the
    way are not arrows of their own)."""
    files = spec_files()
    known = {module_name(p) for p in files}
    graph = {}
    for path in files:
        name = module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                parts = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                module = ".".join(parts + ([node.module] if node.module else []))
                found.update(f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names)
        graph[name] = {m for m in found if m in known and m != name}
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for m in graph[todo.pop()] - seen:
            seen.add(m)
            todo.append(m)
    return seen


def import_cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected groups of more than one module (each holds an import cycle)."""
    groups = []
    for m in graph:
        group = {m} | {n for n in reachable(graph, m) if m in reachable(graph, n)}
        if len(group) > 1 and group not in groups:
            groups.append(group)
    return groups


def test_no_import_cycle_in_the_spec():
    """The torch.save reader has a module of its own (formats/torch_save.py), so the Hugging Face
    and Meta readers no longer import each other; no other cycle exists."""
    assert import_cycles(spec_graph()) == []


# Who may not import whom: each arrow of docs/reading.md runs one way.
OPS = ("norm", "rope", "rope_scaling", "mlp", "attention", "cache", "inputs", "sampling", "numerics")
ABOVE = {**{op: ("model", "generate", "chat", "chat_sandbox", "formats", "cli") for op in OPS},
         "model": ("generate", "chat", "chat_sandbox", "formats", "cli"),
         "generate": ("chat", "chat_sandbox", "formats", "cli"),
         "chat": ("cli", "formats"),
         "chat_sandbox": ("chat", "generate", "model", "cli"),
         "chat_templates": ("chat", "chat_sandbox", "generate", "model", "cli")}


@pytest.mark.parametrize("module", ABOVE)
def test_arrows_run_one_way(module):
    graph = spec_graph()
    below = reachable(graph, f"npllama.{module}")
    for name in ABOVE[module]:
        assert not {m for m in below if m == f"npllama.{name}" or m.startswith(f"npllama.{name}.")}, \
            f"npllama.{module} imports npllama.{name}"


def test_loading_a_checkpoint_imports_no_generation_loop():
    """The loaders need a chat template's text, never the session or the loop that answers with it."""
    graph = spec_graph()
    for loader in [m for m in graph if m.startswith("npllama.formats")]:
        reached = reachable(graph, loader)
        assert not reached & {"npllama.generate", "npllama.chat", "npllama.chat_sandbox"}, loader


def test_the_spec_never_imports_torch_or_its_torch_twin():
    for path in spec_files():
        bad = {m for m in imported_modules(path) if m.split(".")[0] in ("torch", "parity")}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_click_is_imported_only_by_the_command_line():
    for path in spec_files():
        if "cli" in path.relative_to(SPEC).parts:
            continue
        assert "click" not in {m.split(".")[0] for m in imported_modules(path)}, path.relative_to(ROOT)


def test_config_knows_no_file_format():
    text = (SPEC / "config.py").read_text(encoding="utf-8")
    for key in ("num_attention_heads", "hidden_size", "intermediate_size", "rms_norm_eps",
                "max_position_embeddings", "num_key_value_heads", "block_count", "llama.block", "multiple_of",
                "ffn_dim_multiplier", "use_scaled_rope", "params.json", "config.json", "gguf", "GGUF"):
        assert key not in text, f"config.py mentions the file-format key {key!r}"


def test_the_rotation_comes_before_any_scaling_variant():
    text = (SPEC / "rope.py").read_text(encoding="utf-8")
    assert "register" not in text and "yarn" not in text.lower().split("scaled variants")[0]
    names = [n.name for n in ast.parse(text).body if isinstance(n, ast.FunctionDef)]
    assert names[:4] == ["default_inv_freq", "rope_cos_sin", "rotate_half", "apply_rotary_emb"]


def test_fused_weights_split_back_exactly_for_numpy_and_torch():
    args = ModelArgs(dim=16, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=30, hidden_dim=24,
                     attention_bias=True, attention_out_bias=True, mlp_bias=True)
    params = init_params(args, seed=3)
    fused = fuse_params(args, params)
    assert {f"layers.0.{name}.weight" for name in FUSED} <= set(fused)
    assert not any(".wq." in n or ".w1." in n for n in fused)
    back = split_params(args, fused)
    assert set(back) == set(params) and all(np.array_equal(back[n], params[n]) for n in params)
    tensors = {n: torch.from_numpy(a) for n, a in params.items()}
    back = split_params(args, fuse_params(args, tensors, concat=torch.cat))
    assert all(torch.equal(back[n], tensors[n]) for n in params)
    model = Transformer(args, params)
    assert all(np.array_equal(model.state_dict()[n], params[n]) for n in params)


def test_the_model_traces_trace_names_in_their_order():
    """The hook sees every name once, in exactly trace_names' order (what first_overflow relies on)."""
    args = ModelArgs(dim=16, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=30, hidden_dim=24)
    model = Transformer(args, init_params(args))
    seen = []
    model(np.array([[1, 2, 3]]), trace=lambda name, x: seen.append(name))
    assert seen == trace_names(3)
    import parity
    seen_torch = []
    parity.from_numpy(model)(np.array([[1, 2, 3]]), trace=lambda name, x: seen_torch.append(name))
    assert seen_torch == trace_names(3)


# Where a weight of 3e38 first overflows float32, planted in one op's weight of a 1-layer model.
PLANTED = {"tok_embeddings": "tok_embeddings.weight", "layers.0.attention_norm": "layers.0.attention_norm.weight",
           "layers.0.attention.q": "layers.0.attention.wq.weight", "layers.0.attention.k": "layers.0.attention.wk.weight",
           "layers.0.attention.v": "layers.0.attention.wv.weight", "layers.0.attention": "layers.0.attention.wo.weight",
           "layers.0.ffn_norm": "layers.0.ffn_norm.weight", "layers.0.feed_forward": "layers.0.feed_forward.w2.weight",
           "norm": "norm.weight", "logits": "output.weight"}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("op", PLANTED)
def test_first_overflow_names_the_op_where_it_is_planted(op):
    """Both backends name the op (the Torch backend searches with npllama's search, its own test)."""
    import parity
    import parity.numerics
    from npllama.numerics import first_overflow, non_finite_error
    args = ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=30, hidden_dim=24)
    params = init_params(args, seed=1)
    params[PLANTED[op]] = np.full_like(params[PLANTED[op]], 3e38)
    model = Transformer(args, params)
    assert first_overflow(model, np.array([[1, 2, 3]])) == op
    assert f"first in {op})" in str(non_finite_error(model, [1, 2, 3], "the prompt"))
    twin = parity.from_numpy(model)
    assert parity.numerics.first_overflow(twin, np.array([[1, 2, 3]])) == op
    assert f"first in {op})" in str(parity.numerics.non_finite_error(twin, torch.tensor([1, 2, 3]), "the prompt"))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("op,bias", [("layers.0.attention_residual", "layers.0.attention.wo.bias"),
                                     ("layers.0.ffn_residual", "layers.0.feed_forward.w2.bias")])
def test_first_overflow_names_a_residual_sum_whose_terms_did_not(op, bias):
    """The stream (1e19) and a sublayer's output (its bias, 1e19) each below the limit, their sum
    above it: the sum is named. (scores_v cannot overflow alone: softmax(qk) v averages the rows
    of v, which attention.v names first.)"""
    import parity
    import parity.numerics
    from npllama.numerics import SQUARE_LIMIT, first_overflow
    args = ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=30, hidden_dim=24,
                     attention_out_bias=True, mlp_bias=True)
    params = init_params(args, seed=1)
    assert 1e19 < SQUARE_LIMIT < 2e19
    params["tok_embeddings.weight"] = np.full_like(params["tok_embeddings.weight"], 1e19)
    params[bias] = np.full_like(params[bias], 1e19)
    model = Transformer(args, params)
    assert first_overflow(model, np.array([[1, 2, 3]])) == op
    assert parity.numerics.first_overflow(parity.from_numpy(model), np.array([[1, 2, 3]])) == op


def test_reading_md_gives_the_line_counts_of_the_path_as_measured():
    """docs/reading.md's table is what docs/count_lines.py prints now (run it and paste the table)."""
    table = subprocess.run([sys.executable, str(ROOT / "docs" / "count_lines.py")], capture_output=True, text=True,
                           check=True).stdout.strip()
    assert table in (ROOT / "docs" / "reading.md").read_text(encoding="utf-8"), table


SPEC_TESTS = sorted((ROOT / "tests").glob("test_spec_*.py"))


def test_every_op_has_a_numpy_only_test_module():
    names = {p.stem for p in SPEC_TESTS}
    for op in ("norm", "mlp", "rope", "rope_scaling", "attention", "cache", "sampling"):
        assert f"test_spec_{op}" in names and (SPEC / f"{op}.py").exists(), op
    for path in [*SPEC_TESTS, ROOT / "tests" / "spec_formulas.py"]:
        bad = {m for m in imported_modules(path) if m.split(".")[0] in ("torch", "parity", "transformers")}
        assert not bad, f"{path.name} imports {sorted(bad)}"


def test_the_numpy_only_tests_pass_where_torch_cannot_be_imported():
    code = ("import sys; sys.modules['torch'] = None; import pytest; "
            "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-p', 'no:xdist', *sys.argv[1:]]))")
    out = subprocess.run([sys.executable, "-c", code, *map(str, SPEC_TESTS)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout


def test_torch_commands_arrive_as_plug_ins():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    listed = result.output.split("Commands:")[1]
    for name in ("generate", "chat", "eval", "convert", "fetch", "parity", "train"):
        assert f"  {name} " in listed, name


WITHOUT_TORCH = """
import sys
sys.modules["torch"] = None          # `import torch` now fails, as where torch is not installed
from npllama.cli import main
main(sys.argv[1:])
"""


def run_without_torch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_TORCH, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_without_torch_the_help_says_what_the_plug_ins_need():
    out = run_without_torch("--help")
    assert out.returncode == 0, out.stderr
    assert "parity" in out.stdout and "needs torch" in out.stdout
    out = run_without_torch("parity")
    assert out.returncode != 0 and "pip install 'npllama[torch]'" in out.stderr


@pytest.mark.slow
def test_eval_computes_perplexity_with_numpy_where_torch_is_absent(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("The capital of France is Paris. The capital of Italy is Rome.\n" * 3, encoding="utf-8")
    out = run_without_torch("eval", "--data", str(text), "--seq-len", "16", "--json")
    assert out.returncode == 0, out.stderr
    assert '"backend": "numpy"' in out.stdout and '"perplexity"' in out.stdout
    out = run_without_torch("eval", "--data", str(text), "--backend", "torch")
    assert out.returncode != 0 and "torch" in out.stderr
