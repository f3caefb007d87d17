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
