"""Shared test set-up.

The suite runs as two pytest-xdist workers on two cores; a BLAS or OpenMP pool of two threads in
each would oversubscribe the cores and slow matrix products by an order of magnitude, so each
worker computes single-threaded. (Set before NumPy or torch is first imported.)
"""

import os

for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")

os.environ.setdefault("HF_HUB_OFFLINE", "1")          # no model hub at run time: everything is local
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
if "NPLLAMA_CACHE" not in os.environ:                  # npllama's own cache (checkpoint hashes): not the user's
    import atexit
    import shutil
    import tempfile
    os.environ["NPLLAMA_CACHE"] = tempfile.mkdtemp(prefix="npllama-test-cache-")
    atexit.register(shutil.rmtree, os.environ["NPLLAMA_CACHE"], True)


import signal  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def no_hang():
    """A hostile input that makes a loader loop (a lying length, a template that never ends) fails
    the test after 60 s instead of hanging the run (test_errors.py, test_hostile.py)."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def stop(signum, frame):
        raise TimeoutError("took more than 60 s: a hostile input hangs the code that reads it")
    old = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, 60)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(autouse=True, scope="module")
def no_process_group_left():
    """A command run in-process here (CliRunner) may make a process group, as `--tp 1` and Meta's
    port (fairscale) do; in its own process the group ends with the process. Here the worker goes on
    to other modules, and test_tp's ranks, forked from it, must not inherit a group: each module's
    groups end with the module."""
    yield
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available():
        return
    fairscale = sys.modules.get("fairscale.nn.model_parallel.initialize")
    if fairscale is not None and fairscale.model_parallel_is_initialized():
        fairscale.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
