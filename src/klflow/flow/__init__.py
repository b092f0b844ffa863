"""KL-geodesic flow matching (arXiv 2411.16821): the path, its samplers, the hybrid's switch rule,
banded validation, time warps, training-time distributions and the exact toy posterior.

The registered Method is klflow.flow.method.KLFlow (`klflow.methods.build_method("klflow", ...)`).
It is not imported here: it loads klflow.methods, whose autoregressive baseline imports klflow.model,
which imports this package's path, so importing it here would make a cycle.
"""

from klflow.flow.exact import ExactPosterior
from klflow.flow.path import KLPath, argmax_probability, calibrate_t_max
from klflow.flow.sampler import (
    DEFAULT_TEMPERATURE,
    INTEGRATORS,
    SAMPLERS,
    SELECTS,
    SWITCH_CALIBRATIONS,
    KLFlowSampler,
    SamplerOptions,
    Selection,
    generate,
)
from klflow.flow.switch import calibrate_switch, entropy_along_ode, entropy_on_data
from klflow.flow.time_sampling import TIME_SAMPLINGS, TimeSampling
from klflow.flow.time_warp import WARPS, TimeWarp, alpha_warp, learned_warp
from klflow.flow.validation import BAND_EDGES, banded_validation

__all__ = ["BAND_EDGES", "DEFAULT_TEMPERATURE", "INTEGRATORS", "SAMPLERS", "SELECTS", "SWITCH_CALIBRATIONS",
           "TIME_SAMPLINGS", "WARPS", "ExactPosterior", "KLFlowSampler", "KLPath", "SamplerOptions", "Selection",
           "TimeSampling", "TimeWarp", "alpha_warp", "argmax_probability", "banded_validation", "calibrate_switch", "calibrate_t_max",
           "entropy_along_ode", "entropy_on_data", "generate",
           "learned_warp"]
