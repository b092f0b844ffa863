"""`klflow bench PRESET`: the paper's experiments as one resumable command."""

from __future__ import annotations

import argparse
from pathlib import Path

from klflow.bench.preset import bench_preset_names, load_bench_preset
from klflow.bench.runner import run_bench


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of `klflow bench`, with cmd_bench as its handler."""
    p.add_argument("preset", help=f"a bench preset ({', '.join(bench_preset_names())}) or a .toml file")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder; run the same command again to resume (default runs/bench-PRESET)")
    p.add_argument("--data", default=None,
                   help="the corpus every method trains on: a named corpus, a text/JSONL file or folder, hf:NAME, "
                        "or a prepared data folder (required by the GPU presets)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a preset value, e.g. --set train.max_steps=200 or --set bench.num_samples=32 (repeatable)")
    p.add_argument("--models", default=None, metavar="KEY[,KEY]",
                   help="a part of the bench: train and sample only these models (keys as in RESULTS.md), so that "
                        "parts can run side by side on one cache; the report waits for a run without --models")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    preset = load_bench_preset(args.preset, args.overrides, args.data)
    out = args.out or Path("runs") / f"bench-{preset.name}"
    models = [key.strip() for key in args.models.split(",") if key.strip()] if args.models is not None else None
    results = run_bench(preset, out, progress=not args.no_progress, models=models)
    if results is None:
        print(f"bench {preset.name}: the part {', '.join(models or [])} is done; "
              "run without --models for the report")
        return 0
    print(f"bench {preset.name}: {len(results['cells'])} cells evaluated; tables in {out / 'RESULTS.md'}")
    return 0
