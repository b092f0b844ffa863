"""klflow: non-autoregressive text generation with KL-geodesic flow matching (arXiv 2411.16821)."""

import importlib
import os
import sys

# Read by PyTorch's CPU allocator when torch loads: large tensors on transparent huge pages, since
# fresh [B, L, V] buffers otherwise fault in 4 KB at a time (measured in docs/performance.md).
# THP_MEM_ALLOC_ENABLE=0 in the environment keeps it off.
if "torch" not in sys.modules:
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from klflow.errors import KLFlowError

__version__ = "0.1.0"

# The public names that need torch load on first use, so that `klflow --help` starts without it.
_LAZY = {"ExactPosterior": "klflow.flow", "KLPath": "klflow.flow", "argmax_probability": "klflow.flow",
         "calibrate_t_max": "klflow.flow", "generate": "klflow.flow", "nfe": "klflow.sampling",
         "load": "klflow.trained", "TrainedModel": "klflow.trained"}

__all__ = ["KLFlowError", *_LAZY]


def __getattr__(name: str) -> object:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'klflow' has no attribute {name!r}")
