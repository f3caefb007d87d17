"""The parity table: traced activations compared with the reference's, op by op, and the verdict.

Everything here is NumPy: the rows and the verdict do not care who computed the candidate (the
Torch backend, transformers, or anyone's port that wrote a dump, npllama/oracle.py).

    rows = compare(reference, candidate, rtol)     # name -> array, both; rtol(name) -> the bar
    report = Report(title, rows, dtype, device)
    print(format_table(report))                    # every row, the verdict last
    print(format_compact(report))                  # the verdict first, the rows that matter

A row's error is norm-relative: rel = max|candidate - reference| / max|reference|, so a tensor
with a few huge channels is judged on the scale it lives at (docs/parity.md). The first row, in
forward order (npllama.model.trace_names), whose rel is over its tolerance is the *first break*:
every op downstream of a bug breaks too, so only the first one says where to look.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .errors import InputError
from .io import atomic_write
from .model import trace_names


# ---------------------------------------------------------------------------- rows and reports
@dataclass(frozen=True)
class Row:
    """One op of one layer: its errors against the reference, and its tolerance."""
    name: str            # the trace name, e.g. "layers.3.ffn_norm"
    layer: int | None    # 3, or None for tok_embeddings / norm / logits
    op: str              # "ffn_norm"
    max_abs: float       # max |candidate - reference|
    rel: float           # max_abs / max |reference|
    rtol: float

    @property
    def ok(self) -> bool:
        return self.rel <= self.rtol      # False for nan

    @property
    def severity(self) -> float:
        """rel / rtol: over 1 is a break; nan counts as infinitely bad."""
        return math.inf if math.isnan(self.rel) else self.rel / self.rtol


@dataclass
class Report:
    title: str
    rows: list[Row]
    dtype: str
    device: str
    notes: list[str] = field(default_factory=list)

    @property
    def first_break(self) -> Row | None:
        """The first op, in forward order, over its tolerance (None when all are within)."""
        return next((r for r in self.rows if not r.ok), None)

    @property
    def ok(self) -> bool:
        return self.first_break is None


def split_name(name: str) -> tuple[int | None, str]:
    """'layers.3.attention.q' -> (3, 'attention.q'); 'logits' -> (None, 'logits')."""
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit():
        return int(parts[1]), parts[2]
    return None, name


def errors(candidate: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(max |a - b|, max |a - b| / max |b|), in float64; shapes must agree."""
    if candidate.shape != reference.shape:
        raise InputError(f"shapes differ: {candidate.shape} vs reference {reference.shape}")
    diff = float(np.max(np.abs(candidate.astype(np.float64) - reference.astype(np.float64)), initial=0.0))
    scale = float(np.max(np.abs(reference), initial=0.0))
    if math.isnan(diff):
        return diff, diff
    rel = diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
    return diff, rel


def compare(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray],
            rtol: Callable[[str], float], require_all: bool = True) -> list[Row]:
    """Rows for every op of the reference trace (in its order) that the candidate also traced.

    require_all: a name missing from the candidate is an error (the backends must trace alike).
    """
    missing = [n for n in reference if n not in candidate]
    if require_all and missing:
        raise InputError(f"the candidate did not trace {missing[:5]}: the backends' trace names differ")
    rows = []
    for name, ref in in_forward_order(reference).items():
        if name not in candidate:
            continue
        max_abs, rel = errors(candidate[name], ref)
        layer, op = split_name(name)
        rows.append(Row(name, layer, op, max_abs, rel, rtol(name)))
    return rows


def in_forward_order(traced: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The traced tensors in the order the forward pass computes them (npllama.model.trace_names),
    whatever order the hook saw them in; names outside that list keep their place at the end."""
    layers = [split_name(n)[0] for n in traced]
    order = trace_names(1 + max((i for i in layers if i is not None), default=-1))
    rank = {name: i for i, name in enumerate(order)}
    return dict(sorted(traced.items(), key=lambda item: rank.get(item[0], len(rank))))


# ---------------------------------------------------------------------------- text
HEADER = f"{'layer':>5}  {'op':<20} {'max abs':>10} {'rel':>10} {'rtol':>8}  ok"


def format_row(r: Row) -> str:
    layer = "-" if r.layer is None else str(r.layer)
    return (f"{layer:>5}  {r.op:<20} {r.max_abs:10.3e} {r.rel:10.3e} {r.rtol:8.1e}  "
            f"{'ok' if r.ok else 'BREAK'}")


def format_table(report: Report) -> str:
    """The report as a fixed-width table of every row, with the verdict on its last line."""
    lines = [report.title, HEADER, *(format_row(r) for r in report.rows)]
    lines.extend(f"note: {n}" for n in report.notes)
    lines.append(verdict(report))
    return "\n".join(lines)


def format_compact(report: Report, around: int = 2) -> str:
    """The report for a terminal: the verdict first, the rows around the first break, and the
    worst op of each layer (rel / rtol largest) instead of every op of every layer."""
    lines = [report.title, verdict(report)]
    b = report.first_break
    if b is not None:
        i = report.rows.index(b)
        lines += ["", "around the first break:", HEADER,
                  *(format_row(r) for r in report.rows[max(0, i - around): i + around + 1])]
    lines += ["", "worst op of each layer:", HEADER, *(format_row(r) for r in worst_per_layer(report.rows))]
    lines.extend(f"note: {n}" for n in report.notes)
    lines.append(f"({len(report.rows)} rows; --all prints every one)")
    return "\n".join(lines)


def worst_per_layer(rows: list[Row]) -> list[Row]:
    """The row of largest rel / rtol in each layer, in forward order; rows outside the layers
    (tok_embeddings, norm, logits) are kept as they are."""
    worst: dict[object, Row] = {}
    for r in rows:
        key = r.name if r.layer is None else r.layer
        if key not in worst or r.severity > worst[key].severity:
            worst[key] = r
    keep = set(map(id, worst.values()))
    return [r for r in rows if id(r) in keep]


def verdict(report: Report) -> str:
    b = report.first_break
    if b is None:
        worst = max(report.rows, key=lambda r: r.severity, default=None)
        tail = f"; closest: {worst.name} at {worst.rel:.2e} of {worst.rtol:.0e}" if worst else ""
        return f"all {len(report.rows)} ops within tolerance{tail}"
    where = f"layer {b.layer} op {b.op}" if b.layer is not None else f"op {b.op}"
    n = sum(not r.ok for r in report.rows)
    return f"first break: {where} (rel {b.rel:.2e} > rtol {b.rtol:.0e}); {n} of {len(report.rows)} ops over"


# ---------------------------------------------------------------------------- picture
def plot_errors(reports: list[Report], path: str) -> None:
    """A PNG of the relative error of each op by layer (one panel per report), with the tolerance.

    Needs matplotlib. Written atomically (npllama.io.atomic_write), so no half-written file remains.
    """
    try:
        import matplotlib
    except ImportError:
        raise InputError("--plot needs matplotlib, which is not installed (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(len(reports), 1, figsize=(10, 4.2 * len(reports)), squeeze=False)
    for ax, report in zip(axes[:, 0], reports):
        ops = list(dict.fromkeys(r.op for r in report.rows if r.layer is not None))
        for op in ops:
            pts = [(r.layer, max(r.rel, 1e-18)) for r in report.rows if r.op == op and r.layer is not None]
            ax.plot(*zip(*pts), marker=".", label=op)
        for r in report.rows:
            if r.layer is None and r.op != "tok_embeddings":
                last = max((x.layer for x in report.rows if x.layer is not None), default=0)
                ax.scatter([last + 0.5], [max(r.rel, 1e-18)], marker="*", s=80, label=r.op)
        for rtol in sorted({r.rtol for r in report.rows}):
            ax.axhline(rtol, color="red", linestyle="--", linewidth=1)
        b = report.first_break
        if b is not None and b.layer is not None:
            ax.axvline(b.layer, color="red", alpha=0.3, linewidth=6)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_ylabel("max|a-b| / max|b|")
        ax.set_title(report.title, fontsize=9)
        ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    with atomic_write(path) as f:
        f.write(buf.getvalue())
