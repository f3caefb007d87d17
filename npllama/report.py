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

A dump checked by the oracle (several steps, perhaps) also carries what its verdict covers and
where its bar came from (``Report.coverage``, ``Report.bar``); ``Report.exit_code`` is then 0 (every
op within its bar and the comparison covers what a port must match), 1 (a break), or
EXIT_NOT_COVERED (nothing broke, but too little was compared to say the port matches).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .errors import InputError
from .io import atomic_write
from .model import LAYER_TRACE_NAMES


EXIT_BREAK = 1          # an op over its bar
EXIT_NOT_COVERED = 3    # nothing over its bar, but the comparison does not cover what a port must match
                        # (2 is bad input: npllama's InputError, click's usage errors)


# ---------------------------------------------------------------------------- rows and reports
@dataclass(frozen=True)
class Row:
    """One op of one layer (of one step): its errors against the reference, and its tolerance."""
    name: str            # the trace name, e.g. "layers.3.ffn_norm"
    layer: int | None    # 3, or None for tok_embeddings / norm / logits
    op: str              # "ffn_norm"
    max_abs: float       # max |candidate - reference|
    rel: float           # max_abs / max |reference|
    rtol: float
    step: int = 0        # the forward call: 0 the prefill, s >= 1 the s-th decode step

    @property
    def ok(self) -> bool:
        return self.rel <= self.rtol      # False for nan

    @property
    def severity(self) -> float:
        """rel / rtol: over 1 is a break; nan counts as infinitely bad."""
        return math.inf if math.isnan(self.rel) else self.rel / self.rtol


@dataclass
class Coverage:
    """What a verdict covers: the names it had to compare, those the candidate lacked, and how
    they were chosen (the default: the residual stream of every layer and the logits)."""
    what: str                                   # "the residual stream of every layer and the logits"
    required: int                               # how many (step, name) pairs that is
    missing: list[tuple[int, str]] = field(default_factory=list)   # (step, name) not compared
    only: str | None = None                     # the --only the person gave, if any

    @property
    def complete(self) -> bool:
        return not self.missing


@dataclass
class Bar:
    """Where a report's tolerances came from: the dtype, the kind of run, and why that dtype."""
    dtype: str           # "float32"
    kind: str            # "model" (end to end) or "layer" (each layer from its own input)
    rtol: float          # the bar of that dtype and kind (a tensor stored coarser is held to its own)
    source: str          # "from the dtype the dump declares; its tensors hold float32 numbers"


@dataclass
class Report:
    title: str
    rows: list[Row]
    dtype: str
    device: str
    notes: list[str] = field(default_factory=list)
    coverage: Coverage | None = None    # None: the comparison covers everything by construction
    bar: Bar | None = None
    steps: int = 1
    break_ranks: list[int] | None = None   # the ranks whose piece of the first break carries the error

    @property
    def first_break(self) -> Row | None:
        """The first op, in forward order, over its tolerance (None when all are within)."""
        return next((r for r in self.rows if not r.ok), None)

    @property
    def ok(self) -> bool:
        return self.first_break is None

    @property
    def exit_code(self) -> int:
        """0: within every bar and covered; 1: a break; EXIT_NOT_COVERED: too little compared."""
        if not self.ok:
            return EXIT_BREAK
        if self.coverage is not None and not self.coverage.complete:
            return EXIT_NOT_COVERED
        return 0


def split_name(name: str) -> tuple[int | None, str]:
    """'layers.3.attention.q' -> (3, 'attention.q'); 'logits' -> (None, 'logits').

    The layer index is ASCII digits, at most nine of them: '²' passes str.isdigit() but is no
    index, and a name is no reason to count to a billion.
    """
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[1].isascii() and parts[1].isdigit() \
            and len(parts[1]) <= 9:
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
            rtol: Callable[[str], float], require_all: bool = True, step: int = 0) -> list[Row]:
    """Rows for every op of the reference trace (in its order) that the candidate also traced.

    require_all: a name missing from the candidate is an error (the backends must trace alike).
    step: the forward call the tensors come from (the rows say so).
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
        rows.append(Row(name, layer, op, max_abs, rel, rtol(name), step))
    return rows


def in_forward_order(traced: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The traced tensors in the order the forward pass computes them (npllama.model.trace_names),
    whatever order the hook saw them in; names outside that list keep their place at the end."""
    return dict(sorted(traced.items(), key=lambda item: forward_position(item[0])))


def forward_position(name: str) -> tuple[int, int, int]:
    """A sort key that puts trace names in forward order (tok_embeddings, layer by layer in
    LAYER_TRACE_NAMES order, norm, logits) and every other name after them. Computed from the
    name alone: a name with a huge layer index costs nothing."""
    layer, op = split_name(name)
    if layer is not None and op in LAYER_TRACE_NAMES:
        return (1, layer, LAYER_TRACE_NAMES.index(op))
    return {"tok_embeddings": (0, 0, 0), "norm": (2, 0, 0), "logits": (2, 1, 0)}.get(name, (3, 0, 0))


# ---------------------------------------------------------------------------- text
HEADER = f"{'layer':>5}  {'op':<20} {'max abs':>10} {'rel':>10} {'rtol':>8}  ok"


def header(steps: int = 1) -> str:
    """The table's header: a step column first when the report has several steps."""
    return HEADER if steps <= 1 else f"{'step':>4} {HEADER}"


def format_row(r: Row, steps: int = 1) -> str:
    layer = "-" if r.layer is None else str(r.layer)
    row = (f"{layer:>5}  {r.op:<20} {r.max_abs:10.3e} {r.rel:10.3e} {r.rtol:8.1e}  "
           f"{'ok' if r.ok else 'BREAK'}")
    return row if steps <= 1 else f"{r.step:>4} {row}"


def format_table(report: Report) -> str:
    """The report as a fixed-width table of every row, with the verdict on its last line."""
    lines = [report.title, header(report.steps), *(format_row(r, report.steps) for r in report.rows)]
    lines.extend(f"note: {n}" for n in report.notes)
    lines.append(verdict(report))
    return "\n".join(lines)


def format_compact(report: Report, around: int = 2) -> str:
    """The report for a terminal: the verdict first, the rows around the first break, and the
    worst op of each layer (rel / rtol largest) instead of every op of every layer."""
    n = report.steps
    lines = [report.title, verdict(report)]
    b = report.first_break
    if b is not None:
        i = report.rows.index(b)
        lines += ["", "around the first break:", header(n),
                  *(format_row(r, n) for r in report.rows[max(0, i - around): i + around + 1])]
    lines += ["", "worst op of each layer:" if n <= 1 else "worst op of each layer, over the steps:", header(n),
              *(format_row(r, n) for r in worst_per_layer(report.rows))]
    lines.extend(f"note: {note}" for note in report.notes)
    lines.append(f"({len(report.rows)} rows; --all prints every one)")
    return "\n".join(lines)


def worst_per_layer(rows: list[Row]) -> list[Row]:
    """The row of largest rel / rtol in each layer, in forward order; outside the layers
    (tok_embeddings, norm, logits), the worst row of each name over the steps."""
    worst: dict[object, Row] = {}
    for r in rows:
        key = r.name if r.layer is None else r.layer
        if key not in worst or r.severity > worst[key].severity:
            worst[key] = r
    return sorted(worst.values(), key=lambda r: forward_position(r.name))


def step_label(step: int) -> str:
    """'prefill' for step 0, 'decode step s' after."""
    return "prefill" if step == 0 else f"decode step {step}"


def verdict(report: Report) -> str:
    """One line: the first break, or that every op is within its bar; for a checked dump, what the
    comparison covers and where the bar came from (docs/parity.md, "When --against exits 0")."""
    b = report.first_break
    cov, bar = report.coverage, report.bar
    tail = ""
    if bar is not None:
        kind = "each layer from its own input" if bar.kind == "layer" else "end to end"
        tail = f"; bar: {bar.dtype} {kind}, {bar.rtol:.0e}, {bar.source}"
    if b is not None:
        where = f"layer {b.layer} op {b.op}" if b.layer is not None else f"op {b.op}"
        if report.steps > 1:
            where = f"step {b.step} ({step_label(b.step)}), {where}"
        if report.break_ranks:
            where += f", in rank {' and '.join(map(str, report.break_ranks))}'s piece"
        n = sum(not r.ok for r in report.rows)
        return f"first break: {where} (rel {b.rel:.2e} > rtol {b.rtol:.0e}); {n} of {len(report.rows)} ops over{tail}"
    worst = max(report.rows, key=lambda r: r.severity, default=None)
    closest = f"; closest: {worst.name} at {worst.rel:.2e} of {worst.rtol:.0e}" if worst else ""
    if report.steps > 1 and worst is not None:
        closest += f" ({step_label(worst.step)})"
    n = len(report.rows)
    within = f"all {n} ops within tolerance" if n != 1 else "1 op within tolerance"
    if cov is None:
        return f"{within}{closest}"
    if not cov.complete:
        return (f"not enough compared: {within.removeprefix('all ')}, but a pass needs {cov.what}, and "
                f"{len(cov.missing)} of those {cov.required} tensors are not in the dump "
                f"({summarize_missing(cov.missing)}): write them, or name what to judge with --only{tail}")
    scope = f"covers {cov.what}" if cov.only is None else f"covers only {cov.what} (--only {cov.only})"
    return f"{within}{closest}; {scope}{tail}"


def summarize_missing(missing: Sequence[tuple[int, str]], most: int = 4) -> str:
    """(step, name) pairs as a short list: 'layers.0.ffn_residual, logits (steps 0-8) ...'."""
    by_name: dict[str, list[int]] = {}
    for step, name in missing:
        by_name.setdefault(name, []).append(step)
    steps = {tuple(s) for s in by_name.values()}
    names = list(by_name)
    shown = ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")
    if steps == {(0,)}:
        return shown
    if len(steps) == 1:
        s = sorted(next(iter(steps)))
        return f"{shown} (step{'s' if len(s) > 1 else ''} {', '.join(map(str, s[:6]))}{' ...' if len(s) > 6 else ''})"
    return f"{shown} (in some steps)"


# ---------------------------------------------------------------------------- data
def report_data(report: Report) -> dict:
    """The report as plain data (``--json``): the verdict, the bar, the coverage, every row.

    Numbers that are not finite (a NaN or infinite error) are written as the strings "nan" / "inf".
    """
    def num(x: float):
        return x if math.isfinite(x) else str(x)

    def row(r: Row) -> dict:
        return {"step": r.step, "name": r.name, "layer": r.layer, "op": r.op, "max_abs": num(r.max_abs),
                "rel": num(r.rel), "rtol": r.rtol, "ok": r.ok}

    code = report.exit_code
    b = report.first_break
    worst = max(report.rows, key=lambda r: r.severity, default=None)
    cov, bar = report.coverage, report.bar
    return {
        "verdict": {0: "pass", 1: "break", EXIT_NOT_COVERED: "not enough compared"}[code],
        "exit_code": code,
        "line": verdict(report),
        "title": report.title,
        "dtype": report.dtype,
        "steps": report.steps,
        "bar": None if bar is None else {"dtype": bar.dtype, "kind": bar.kind, "rtol": bar.rtol, "origin": bar.source},
        "coverage": None if cov is None else {
            "what": cov.what, "only": cov.only, "required": cov.required, "complete": cov.complete,
            "missing": [{"step": s, "name": n} for s, n in cov.missing]},
        "first_break": None if b is None else {**row(b), "ranks": report.break_ranks},
        "closest": None if worst is None else row(worst),
        "ops_over": sum(not r.ok for r in report.rows),
        "notes": list(report.notes),
        "rows": [row(r) for r in report.rows],
    }


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
