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
