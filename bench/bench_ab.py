"""Decode speed of the NumPy reference in two source trees, in interleaved rounds: before and after.

A change that should cost nothing (a restructure of the spec, a new default for where weights
live) is measured here: each round runs the same decode in a fresh process from tree A, then from
tree B (the order alternating between rounds), so that a drift in the shared host's speed hits
both alike; the medians and their ratio are reported. Every process loads the default model (or
--model) and times --tokens greedy decode steps with a KV cache after a 32-token prompt. On a
shared host the rates move with the neighbours' load; the fastest single step of each tree over
all its rounds is reported beside them, the cost of a step when nothing else ran.

    git worktree add /tmp/before HEAD~1            # the tree before the change
    .venv/bin/python bench/bench_ab.py /tmp/before . [--rounds 7] [--tokens 48] [--extra "mapped=True"]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np
import npllama
kwargs = eval("dict(" + sys.argv[4] + ")")
model = npllama.load(sys.argv[2] or None, progress=False, **kwargs)
prompt = (np.arange(32) * 7919 % model.config.vocab_size)[None]
cache = model.new_cache(1)
logits = model(prompt, cache=cache)
steps = []
for _ in range(int(sys.argv[3])):
    t = time.perf_counter()
    logits = model(np.array([[int(logits[0, -1].argmax())]]), cache=cache)
    steps.append(time.perf_counter() - t)
print(json.dumps({"steps": steps, "file": npllama.__file__}))
"""


def run(tree: str, model: str, tokens: int, extra: str) -> tuple[float, float]:
    """(decode tok/s, the fastest step in seconds) of one process."""
    done = subprocess.run([sys.executable, "-c", CHILD, os.path.abspath(tree), model, str(tokens), extra],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    if done.returncode != 0:
        raise SystemExit(f"{tree}: {done.stderr.strip().splitlines()[-1] if done.stderr else done.returncode}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    if not out["file"].startswith(os.path.abspath(tree)):
        raise SystemExit(f"{tree}: imported npllama from {out['file']}, not from the tree")
    return tokens / sum(out["steps"]), min(out["steps"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", help="the source tree before the change")
    ap.add_argument("after", help="the source tree after it")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--model", default="", help="a model path (default: the default model)")
    ap.add_argument("--extra", default="", help="keyword arguments of npllama.load in the after tree, e.g. mapped=False")
    args = ap.parse_args()
    rates: dict[str, list[float]] = {"before": [], "after": []}
    fastest = {"before": float("inf"), "after": float("inf")}
    for r in range(args.rounds):
        order = [("before", args.before, ""), ("after", args.after, args.extra)]
        for name, tree, extra in (order if r % 2 == 0 else order[::-1]):
            rate, step = run(tree, args.model, args.tokens, extra)
            rates[name].append(rate)
            fastest[name] = min(fastest[name], step)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"machine: {cpu}, {os.cpu_count()} cores; date: {datetime.date.today()}")
    print(f"command: .venv/bin/python bench/bench_ab.py BEFORE AFTER --rounds {args.rounds} --tokens {args.tokens}"
          f"{' --extra ' + repr(args.extra) if args.extra else ''}\n")
    print("| tree | decode tok/s, median | range | fastest step, ms |")
    print("|---|---|---|---|")
    for name, values in rates.items():
        print(f"| {name} | {statistics.median(values):.1f} | {min(values):.1f}-{max(values):.1f} "
              f"| {1e3 * fastest[name]:.1f} |")
    ratio = statistics.median(rates["after"]) / statistics.median(rates["before"])
    print(f"\nafter / before: {ratio:.3f} (medians of {args.rounds} interleaved rounds); "
          f"fastest steps: {fastest['before'] / fastest['after']:.3f}")


if __name__ == "__main__":
    main()
