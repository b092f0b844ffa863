"""`klflow eval`: score a samples file against held-out text and write the report."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from klflow.errors import KLFlowError
from klflow.evaluation.evaluator import SMOLLM2, load_evaluator
from klflow.evaluation.mauve import MIN_TEXTS, check_sizes, mauve
from klflow.evaluation.perplexity import PPL_MODES
from klflow.evaluation.reference import data_for_samples, validation_texts
from klflow.evaluation.report import build_report, format_table, write_report
from klflow.evaluation.samples import SampleSet, read_samples
from klflow.evaluation.unconditional import evaluate_unconditional


def add_eval_parser(subparsers) -> None:
    """Register `eval` on the `klflow` command's subparsers."""
    p = subparsers.add_parser("eval", help="gen-PPL with entropy, distinct-n, repetition and MAUVE of a samples file")
    p.add_argument("samples", type=Path, help='JSON lines with a "text" field, e.g. from `klflow sample --output`')
    p.add_argument("--reference", default="val",
                   help="'val' (default): held-out windows of the training data's validation split, the same length "
                        "as the samples, scored as the data row and used for MAUVE; 'none'; or a .jsonl file of texts")
    p.add_argument("--data", default=None,
                   help="for --reference val: a prepared data folder or a corpus source "
                        "(default: the data_dir recorded in the samples' checkpoint)")
    p.add_argument("--evaluator", action="append", default=None,
                   help=f"the judge: '{SMOLLM2}' (default), a klflow run or checkpoint trained with --method ar on the "
                        "same corpus (the in-domain judge, with its own tokenizer), or a local Hugging Face causal-LM "
                        "folder; repeat it to score with several judges side by side")
    p.add_argument("--ppl-mode", choices=PPL_MODES, default="mdlm",
                   help="headline gen-PPL: 'mdlm' = exp(corpus mean NLL) (default), 'per-sample' = mean of per-text PPL")
    p.add_argument("--max-samples", type=int, default=None, help="evaluate only the first N samples")
    p.add_argument("--mauve", action=argparse.BooleanOptionalAction, default=None,
                   help="MAUVE of the samples against the reference (default: on when there is a reference)")
    p.add_argument("--output", type=Path, default=None, help="write the JSON report here")
    p.add_argument("--batch-size", type=int, default=16, help="texts per evaluator forward pass (default 16)")
    p.add_argument("--max-length", type=int, default=1024, help="evaluator tokens kept per text (default 1024)")
    p.add_argument("--device", default="auto", help="'auto' (cuda when available), 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if args.batch_size < 1 or args.max_length < 1:
        raise KLFlowError(f"--batch-size and --max-length must be >= 1, got {args.batch_size} and {args.max_length}")
    evaluator_names = _evaluator_names(args.evaluator)
    samples = read_samples(args.samples, args.max_samples)
    reference_texts, reference = _reference(samples, args.reference, args.data)
    if args.mauve:
        if reference_texts is None:
            raise KLFlowError("--mauve needs a reference (--reference val or a .jsonl file)")
        check_sizes(len(samples.texts), len(reference_texts))
    use_mauve = args.mauve
    if use_mauve is None:  # on by default, but not worth an error when there are too few texts
        use_mauve = reference_texts is not None and min(len(samples.texts), len(reference_texts)) >= MIN_TEXTS
        if reference_texts is not None and not use_mauve:
            print(f"note: MAUVE skipped, it needs at least {MIN_TEXTS} texts on each side", file=sys.stderr)
    device = _device(args.device)
    evaluators = [load_evaluator(name, device) for name in evaluator_names]
    progress = not args.no_progress
    sample_row = evaluate_unconditional("samples", samples.texts, evaluators, args.max_length, args.batch_size, progress)
    data_row = None
    if reference_texts is not None:
        name = "data" if args.reference == "val" else "reference"
        data_row = evaluate_unconditional(name, reference_texts, evaluators, args.max_length, args.batch_size, progress)
    scores = None
    if use_mauve and data_row:
        scores = [mauve(ours.scores.features, theirs.scores.features)
                  for ours, theirs in zip(sample_row.judged, data_row.judged, strict=True)]
    report = build_report(samples, sample_row, evaluators, args.ppl_mode, args.max_length, data_row, reference, scores,
                          seconds=round(time.perf_counter() - started, 1))
    print(format_table(report))
    if args.output:
        write_report(report, args.output)
        print(f"wrote {args.output}")
    return 0


def _evaluator_names(given: list[str] | None) -> list[str]:
    names = given or [SMOLLM2]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise KLFlowError(f"--evaluator {repeated[0]} is given twice")
    return names


def _reference(samples: SampleSet, reference: str, data: str | None) -> tuple[list[str] | None, dict]:
    """The reference texts (as many as there are samples) and how they were chosen."""
    n = len(samples.texts)
    if reference != "val" and data is not None:
        raise KLFlowError("--data only applies to --reference val")
    if reference == "none":
        return None, {"kind": "none", "description": "none"}
    if reference == "val":
        prepared = data_for_samples(samples, data)
        seq_len = samples.token_length()
        texts = validation_texts(prepared, n, seq_len)
        description = f"{len(texts)} windows of {seq_len} tokens spread over the validation split of {prepared.dir}"
        info = {"kind": "val", "data_dir": str(prepared.dir), "source": prepared.meta.get("source"), "seq_len_tokens": seq_len}
    else:
        texts = read_samples(reference, max_samples=n, kind="reference").texts
        description = f"the first {len(texts)} texts of {reference}"
        info = {"kind": "file", "file": reference}
    if len(texts) < n:
        print(f"warning: only {len(texts)} reference texts for {n} samples", file=sys.stderr)
    return texts, {**info, "n_texts": len(texts), "description": description}


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise KLFlowError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KLFlowError(f"device {name} requested but CUDA is not available")
    return device
