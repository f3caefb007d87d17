"""How long the model path is: the lines of npllama's files from config to generate.

    python docs/count_lines.py            # the table docs/reading.md shows

The path is the files of docs/reading.md's "The model, top to bottom" up to generate.py, without
the guards' module (inputs.py: input checks, masks, positions) and the run-time checks
(numerics.py). "code" leaves out blank lines, comments and docstrings. The anchors, counted the
same way by hand: picoGPT's gpt2.py, 121 lines; Meta's llama model.py, 302 lines.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SPEC = Path(__file__).resolve().parent.parent / "npllama"
PATH = ("config", "norm", "rope", "rope_scaling", "attention", "mlp", "cache", "model", "sampling", "generate")


def docstring_lines(tree: ast.Module) -> set[int]:
    """Line numbers covered by module, class and function docstrings."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


def count(path: Path) -> tuple[int, int]:
    """(all lines, code lines) of one file."""
    text = path.read_text(encoding="utf-8")
    docs = docstring_lines(ast.parse(text))
    lines = text.splitlines()
    code = sum(1 for n, line in enumerate(lines, 1)
               if line.strip() and not line.strip().startswith("#") and n not in docs)
    return len(lines), code


def table() -> str:
    rows = [(name, *count(SPEC / f"{name}.py")) for name in PATH]
    out = ["| file | lines | code |", "|---|---:|---:|"]
    out += [f"| `{name}.py` | {total} | {code} |" for name, total, code in rows]
    out.append(f"| **the path** | **{sum(r[1] for r in rows)}** | **{sum(r[2] for r in rows)}** |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(table() + "\n")
