"""The GPU benchmark runs end to end (its CPU smoke mode), so that a session lent a GPU does not
spend its few device minutes on a broken script. Speed itself is never asserted here."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_smoke_runs_on_cpu_and_prints_every_row():
    out = subprocess.run([sys.executable, "bench/bench_gpu.py", "--device", "cpu", "--models", "tiny",
                          "--batches", "1", "--new-tokens", "4", "--prompt-len", "8"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| tiny")]
    systems = {row.split("|")[3].strip() for row in rows}
    assert systems == {"npllama fast path", "transformers eager", "transformers static cache"}, out.stdout
    assert "roofline" in out.stdout
    assert "4/4" in out.stdout                     # the fast path's greedy tokens are transformers'
