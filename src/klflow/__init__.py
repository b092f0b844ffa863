"""klflow: non-autoregressive text generation with KL-geodesic flow matching (arXiv 2411.16821)."""

from klflow.errors import KLFlowError
from klflow.exact import ExactPosterior
from klflow.path import KLPath, argmax_probability, calibrate_t_max
from klflow.sampling import generate, nfe

__all__ = ["KLFlowError", "ExactPosterior", "KLPath", "argmax_probability", "calibrate_t_max", "generate", "nfe"]
__version__ = "0.1.0"
