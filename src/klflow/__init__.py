"""klflow: non-autoregressive text generation with KL-geodesic flow matching (arXiv 2411.16821)."""

import os
import sys

# Read by PyTorch's CPU allocator when torch loads: large tensors on transparent huge pages. Fresh
# [B, L, V] buffers otherwise fault in 4 KB at a time; sampling 64 x 128 tokens at V = 4096 took
# 30-35% less time with it (README, Speed). THP_MEM_ALLOC_ENABLE=0 in the environment keeps it off.
if "torch" not in sys.modules:
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from klflow.errors import KLFlowError
from klflow.exact import ExactPosterior
from klflow.path import KLPath, argmax_probability, calibrate_t_max
from klflow.sampling import generate, nfe

__all__ = ["KLFlowError", "ExactPosterior", "KLPath", "TrainedModel", "argmax_probability", "calibrate_t_max",
           "generate", "load", "nfe"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # klflow.load and klflow.TrainedModel import the checkpoint, sampling and Hub code on first use only.
    if name in ("load", "TrainedModel"):
        from klflow import trained

        return getattr(trained, name)
    raise AttributeError(f"module 'klflow' has no attribute {name!r}")
