"""`klflow bench`: every method trained alike, sampled on an NFE grid and sweeps, scored, reported.

Presets live in presets/*.toml; see preset.py for their sections.
"""

from klflow.bench.preset import BenchPreset, bench_preset_names, load_bench_preset
from klflow.bench.runner import run_bench

__all__ = ["BenchPreset", "bench_preset_names", "load_bench_preset", "run_bench"]
