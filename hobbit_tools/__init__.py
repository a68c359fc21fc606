"""hobbit: prepare, profile and run Mixture-of-Experts models larger than fast memory."""

__version__ = "0.1.0"

import os as _os
import sys as _sys

# torch's OpenMP workers spin after each parallel region (GNU OpenMP's default), and beside
# ggml's own thread pool they take the CPU from its workers: on 2 cores with 2 threads each a
# token took 289 ms instead of 7.4. Waiting passively costs torch's few parallel regions in
# decode nothing measurable. Read once, when torch loads its OpenMP: so only before torch.
if "torch" not in _sys.modules and "OMP_WAIT_POLICY" not in _os.environ:
    _os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    OMP_SET_BY_HOBBIT = True
else:
    OMP_SET_BY_HOBBIT = False

# MKL (torch's float32 GEMM) may round differently with the alignment of its operands, so
# two copies of one model (resident and offloaded) gave different prefill logits about one
# run in four (tests/test_prefill.py); its strict reproducible mode does not. MKL reads it
# at its first call.
_os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

from .errors import HobbitError  # noqa: E402
from .quantize.convert import prepare  # noqa: E402
from .runtime import load  # noqa: E402

__all__ = ["HobbitError", "load", "prepare", "__version__"]
