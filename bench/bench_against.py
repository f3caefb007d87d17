"""How long `npllama parity --against` and `npllama trace --against` take on the default model, and where the time goes.

The reference dump is `npllama trace --out` on the default prompt (made once, in a temporary
folder), optionally with --decode N steps. Each command runs end to end in a fresh process, as a
user runs it: wall time and CPU time (user + system, the process and its children). Rounds are
interleaved, so that a drift in the machine's speed hits every variant alike; the median is
reported. Then the phases of one check, in this process: reading the dump, loading the model as
the check does (npllama.oracle.load_reference), the file's sha256, the reference's recomputation
and the comparison (check_dump).

    .venv/bin/python bench/bench_against.py [--rounds 3] [--decode 0] [--prompt TEXT] [--baseline DIR]

--baseline DIR: also time the same commands with the npllama and parity packages of DIR (an
export of another commit: `git archive COMMIT | tar -x -C DIR`) first on the import path.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(args: list[str], pythonpath: str | None) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, exit status) of one command in a fresh process."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "npllama", *args], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done.returncode


def phases(dump: Path) -> list[tuple[str, float, float]]:
    """(phase, wall, CPU) of one check of dump against the default model, in this process."""
    out = []
    clock = [time.perf_counter(), time.process_time()]

    def lap(name):
        w, c = time.perf_counter(), time.process_time()
        out.append((name, w - clock[0], c - clock[1]))
        clock[:] = [w, c]

    from npllama.oracle import check_dump, load_reference, model_sha256, read_dump
    lap("import npllama")
    theirs = read_dump(dump)
    lap("read the dump")
    model = load_reference(None, calls=len(theirs.steps))
    lap("load the model (load_reference)")
    sha = model_sha256(None)
    lap("sha256 of the model file")
    report = check_dump(theirs, model, model_sha256=sha)
    lap(f"recompute and compare ({len(report.rows)} rows)")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decode", type=int, default=0)
    parser.add_argument("--prompt", default=None, help="the trace's prompt (default: npllama trace's)")
    parser.add_argument("--baseline", default=None, metavar="DIR")
    opts = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        ref = Path(tmp) / "ref.safetensors"
        prompt = [] if opts.prompt is None else ["--prompt", opts.prompt]
        made = subprocess.run([sys.executable, "-m", "npllama", "trace", "--out", str(ref), "--decode",
                               str(opts.decode), *prompt], capture_output=True, text=True, check=True)
        print(made.stdout.strip())
        variants = [("this checkout", None)]
        if opts.baseline:
            variants.append((f"baseline {opts.baseline}", str(Path(opts.baseline).resolve())))
        commands = [("parity --against", ["parity", "--against", str(ref)]),
                    ("trace --against", ["trace", "--against", str(ref)])]
        times: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for _ in range(opts.rounds):
            for label, path in variants:
                for name, args in commands:
                    wall, cpu, code = run(args, path)
                    if code not in (0, 1, 3):
                        raise SystemExit(f"{label}: npllama {' '.join(args)} exited {code}")
                    times.setdefault((label, name), []).append((wall, cpu))
        print(f"\n{datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f}; median of {opts.rounds} rounds")
        print(f"{'variant':<28} {'command':<18} {'wall s':>7} {'cpu s':>7}")
        for (label, name), runs in times.items():
            print(f"{label:<28} {name:<18} {statistics.median(w for w, _ in runs):7.2f} "
                  f"{statistics.median(c for _, c in runs):7.2f}")
        print("\nwhere the time goes (this checkout, in-process):")
        for name, wall, cpu in phases(ref):
            print(f"  {name:<36} wall {wall:6.2f}  cpu {cpu:6.2f}")


if __name__ == "__main__":
    main()
