"""`klflow eval`: score a samples file against held-out text and write the report."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from klflow.config import parse_assignment
from klflow.errors import KLFlowError
from klflow.evaluation.evaluator import SMOLLM2, load_evaluator
from klflow.evaluation.mauve import DEFAULT_SEEDS, MIN_SEEDS, check_seeds, mauve, mauve_available, too_few_texts
from klflow.evaluation.perplexity import PPL_MODES
from klflow.evaluation.reference import data_for_samples, validation_texts
from klflow.evaluation.report import build_report, format_table, write_report
from klflow.evaluation.samples import SampleSet, read_samples
from klflow.evaluation.tasks import TASKS, evaluate_infill, evaluate_reply
from klflow.evaluation.unconditional import evaluate_unconditional
from klflow.outputs import check_output_file


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of `klflow eval`, with cmd_eval as its handler."""
    p.add_argument("samples", type=Path, help='JSON lines with a "text" field, e.g. from `klflow sample --out`; '
                                              'with --task, a run or checkpoint directory')
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
    p.add_argument("--mauve-seeds", type=int, default=DEFAULT_SEEDS,
                   help=f"k-means seeds MAUVE is computed under, reported as mean and min-max range "
                        f"(default {DEFAULT_SEEDS}, at least {MIN_SEEDS})")
    p.add_argument("--out", "--output", dest="output", type=Path, default=None, metavar="FILE", help="write the JSON report here")
    p.add_argument("--batch-size", type=int, default=16, help="texts per evaluator forward pass (default 16)")
    p.add_argument("--max-length", type=int, default=1024, help="evaluator tokens kept per text (default 1024)")
    p.add_argument("--device", default="auto", help="'auto' (cuda when available), 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    task = p.add_argument_group("real tasks (--task)", "generate from a checkpoint and score against real data")
    task.add_argument("--task", choices=TASKS, default=None,
                      help="'reply': held-out chitchat-pairs turns -> BLEU/ROUGE-L Top-k and Avg of k replies; "
                           "'infill': HumanEval solutions with lines removed -> pass@k in the sandbox")
    task.add_argument("--limit", type=int, default=None, help="prompts (reply, default 50) or problems (infill, default all)")
    task.add_argument("-n", "--num-samples", type=int, default=None, help="samples per prompt/problem (default 5 reply, 10 infill)")
    task.add_argument("--sample-steps", "--steps", dest="steps", type=int, default=64, metavar="N", help="sampler steps")
    task.add_argument("--sampler", default=None, help="klflow sampler: ode | randomized | hybrid (default randomized)")
    task.add_argument("--option", dest="options", action="append", default=[], metavar="KEY=VALUE",
                      help="a sampling option of the checkpoint's method, e.g. --option select=top_k:5 (repeatable)")
    task.add_argument("--temperature", type=float, default=None,
                      help="temperature of the draws (sets the sampling option temperature; default: the method's)")
    task.add_argument("--top-p", type=float, default=None, help="nucleus of the draws (sets top_p; default 1: all tokens)")
    task.add_argument("--top-k", type=int, default=None, help="draw from the K most probable tokens (sets top_k; default 0: all)")
    task.add_argument("--seed", type=int, default=0, help="seed of the sampler's noise and draws")
    task.add_argument("--fraction", type=float, default=0.1, help="infill: fraction of solution lines removed (default 0.1)")
    task.add_argument("--line-slot", type=int, default=None,
                      help="infill: positions per line hole (default the checkpoint's data.line_slot; 0: each line's length)")
    task.add_argument("--pass-k", default="1,10", help="infill: the k of pass@k, comma-separated (default 1,10; those <= -n)")
    p.set_defaults(handler=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    if args.output is not None:
        check_output_file(args.output, "--output")
    if args.task is not None:
        return cmd_eval_task(args)
    started = time.perf_counter()
    if args.batch_size < 1 or args.max_length < 1:
        raise KLFlowError(f"--batch-size and --max-length must be >= 1, got {args.batch_size} and {args.max_length}")
    evaluator_names = _evaluator_names(args.evaluator)
    samples = read_samples(args.samples, args.max_samples)
    reference_texts, reference = _reference(samples, args.reference, args.data)
    check_seeds(args.mauve_seeds)
    use_mauve = _use_mauve(args.mauve, len(samples.texts), reference_texts)
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
        scores = [mauve(ours.scores.features, theirs.scores.features, args.mauve_seeds)
                  for ours, theirs in zip(sample_row.judged, data_row.judged, strict=True)]
    report = build_report(samples, sample_row, evaluators, args.ppl_mode, args.max_length, data_row, reference, scores,
                          seconds=round(time.perf_counter() - started, 1))
    print(format_table(report))
    if args.output:
        write_report(report, args.output)
        print(f"wrote {args.output}")
    return 0


def cmd_eval_task(args: argparse.Namespace) -> int:
    """`klflow eval --task reply|infill CHECKPOINT`: generate, score, print and optionally write the report."""
    if not 0 <= args.seed < 2**63:
        raise KLFlowError(f"--seed must lie in [0, 2**63), got {args.seed}")
    given = {"sampler": args.sampler, "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    options = {key: value for key, value in given.items() if value is not None}
    for item in args.options:
        key, value = parse_assignment(item)
        options[key.replace("-", "_")] = value
    common = dict(steps=args.steps, options=options, seed=args.seed, device=args.device, progress=not args.no_progress)
    if args.task == "reply":
        report = evaluate_reply(args.samples, n_prompts=args.limit or 50, num_samples=args.num_samples or 5,
                                data=args.data, **common)
        print(f"reply: {report['n_prompts']} prompts x {report['k']} replies ({report['source']}); "
              f"BLEU Top-{report['k']} {report['bleu']['top_k']:.2f} Avg {report['bleu']['avg']:.2f} (smoothed "
              f"{report['bleu_smoothed']['top_k']:.2f} / {report['bleu_smoothed']['avg']:.2f}); "
              f"ROUGE-L Top-{report['k']} {report['rouge_l']['top_k']:.4f} Avg {report['rouge_l']['avg']:.4f}")
    else:
        if args.data is not None:
            raise KLFlowError("--data applies to samples files and --task reply; --task infill uses HumanEval")
        num_samples = args.num_samples or 10
        try:
            ks = sorted({int(k) for k in args.pass_k.split(",") if int(k) <= num_samples})
        except ValueError:
            raise KLFlowError(f"--pass-k must be comma-separated integers, got {args.pass_k!r}") from None
        report = evaluate_infill(args.samples, n_problems=args.limit, fraction=args.fraction, num_samples=num_samples,
                                 ks=ks or [1], line_slot=args.line_slot, **common)
        scores = ", ".join(f"{name} {value:.3f}" for name, value in report["scores"].items())
        print(f"infill: {report['n_problems']} HumanEval problems ({report['n_holes']} line holes of {report['line_slot']} "
              f"positions, {report['fraction']:g} of lines) x {report['k']} samples; {scores}; canonical programs pass "
              f"{report['canonical_pass_rate']:.3f}; {report['n_fitting']} of {report['n_tasks']} problems fit "
              f"(skipped: {report['skipped']})")
    print(f"generation: {', '.join(f'{k}={v}' for k, v in report['generation'].items() if k != 'checkpoint')}")
    if args.output:
        write_report(report, args.output)
        print(f"wrote {args.output}")
    return 0


def _use_mauve(asked: bool | None, n_samples: int, reference_texts: list[str] | None) -> bool:
    """--mauve: on, or a one-line error saying why it cannot run; by default on where it can run, else a note why not."""
    if asked is False:
        return False
    if reference_texts is None:
        if asked:
            raise KLFlowError("--mauve needs a reference (--reference val or a .jsonl file)")
        return False
    reason = mauve_available() or too_few_texts(n_samples, len(reference_texts))
    if reason is not None:
        if asked:
            raise KLFlowError(reason)
        print(f"note: MAUVE skipped: {reason}", file=sys.stderr)
    return reason is None


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
