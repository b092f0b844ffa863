"""The `klflow` command: prepare | train | sample | infill | trace | distill | eval | bench | export | plot | calibrate | quickstart."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Collection, Sequence

from klflow import __version__
from klflow.errors import KLFlowError

if TYPE_CHECKING:
    import torch
    from tqdm import tqdm

    from klflow.checkpoint import Checkpoint
    from klflow.progress import ProgressLines
    from klflow.trained import TrainedModel


TASKS = ("pairs", "infill")
CODE_CORPORA = ("python-code", "humaneval")
# Positions per masked code line: room for most lines of code, little filler (the share that fits: docs/CONDITIONAL.md).
DEFAULT_LINE_SLOT = 24
SAMPLING_BYTES = 32  # bytes per (row, position, vocabulary entry) held at once while sampling
# What `klflow --help` lists. A command's options, and the modules behind them (torch among them),
# load only when that command is named, so the overview and --version answer at once.
COMMANDS = {
    "prepare": "tokenize a corpus into train/validation shards (cached)",
    "train": "train a model: KL flow or a baseline (--method)",
    "sample": "generate text from a checkpoint",
    "infill": "fill the holes of a text: <|hole:N|>, or a line holding only <|hole-line:N|>",
    "trace": "write one HTML page that replays a generation step by step (klflow, mdlm, dfm, sedd runs)",
    "distill": "write a teacher's samples as a data folder to train a student on (sequence-level distillation)",
    "eval": "gen-PPL with entropy, distinct-n, repetition and MAUVE of a samples file; "
            "or, with --task, a checkpoint on chit-chat replies or code infilling",
    "bench": "train every method alike, sample on an NFE grid and sweeps, evaluate, write tables and plots",
    "export": "write a run's model in the Hugging Face Hub's format, with a model card",
    "plot": "draw a run's training and validation loss (and per band of t) as a PNG",
    "calibrate": "the t_max at which x_t reveals the target with a given probability",
    "quickstart": "prepare chit-chat, train on the CPU for a few minutes, sample with all samplers",
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help, unless the help already says it in words or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False or action.default == [] \
                or action.default == argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv[:1] if argv and argv[0] in COMMANDS else ())
    args = parser.parse_args(argv)
    try:
        if args.command not in ("calibrate", "plot"):
            from klflow.threads import use_free_cores

            use_free_cores()
        return args.handler(args)
    except KLFlowError as err:
        print(f"klflow: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        from klflow.outputs import describe_os_error

        print(f"klflow: error: {describe_os_error(err)}", file=sys.stderr)
        return 2
    except MemoryError:
        print("klflow: error: out of memory; lower the batch size, --num-samples or --seq-len", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("klflow: interrupted", file=sys.stderr)
        return 130


def build_parser(commands: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The `klflow` parser with the options of `commands` (None: every command's); the others are listed only."""
    parser = argparse.ArgumentParser(prog="klflow", formatter_class=HelpFormatter,
                                     description="KL-geodesic flow matching for text: prepare, train, sample, infill, trace, evaluate, "
                                                 "bench, export, plot, calibrate.")
    parser.add_argument("--version", action="version", version=f"klflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_arguments = {"prepare": _add_prepare_arguments, "train": _add_train_arguments, "sample": _add_sample_arguments,
                     "infill": _add_infill_arguments, "trace": _add_trace_arguments, "distill": _add_distill_arguments, "eval": _add_eval_arguments, "bench": _add_bench_arguments,
                     "export": _add_export_arguments, "plot": _add_plot_arguments, "calibrate": _add_calibrate_arguments, "quickstart": _add_quickstart_arguments}
    for name, text in COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text, formatter_class=HelpFormatter)
        if commands is None or name in commands:
            add_arguments[name](p)
    return parser


def _add_prepare_arguments(p: argparse.ArgumentParser) -> None:
    from klflow.data.cli import add_prepare_arguments, cmd_prepare

    add_prepare_arguments(p)
    p.set_defaults(handler=cmd_prepare)


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    from klflow.config import preset_names
    from klflow.data.layouts import INFILL_UNITS
    from klflow.methods import method_names

    p.add_argument("--config", default="quickstart", help=f"a preset ({', '.join(preset_names())}) or a .toml file")
    p.add_argument("--data", default=None, help="corpus: 'chitchat' or a local text file/folder (sets data.source)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="tokenizer vocabulary size (sets data.vocab_size; a `klflow prepare --vocab-size N` of the "
                        "same --data is reused)")
    p.add_argument("--method", default=None, help=f"what to train: {', '.join(method_names())} (sets method.name; default klflow)")
    p.add_argument("--out", type=Path, default=None, help="run directory (default runs/<preset>-<time>)")
    p.add_argument("--train-steps", "--steps", dest="steps", type=int, default=None, metavar="N",
                   help="optimizer steps (sets train.max_steps; default the preset's)")
    p.add_argument("--minutes", type=float, default=None, help="wall-clock budget (sets train.max_minutes; default the preset's)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=3e-4 (repeatable)")
    p.add_argument("--task", choices=TASKS, default=None,
                   help="conditional training: 'pairs' (prompt given, reply generated; sets data.layout=pairs) or "
                        "'infill' (random holes; sets data.layout=infill, whole lines for code corpora)")
    p.add_argument("--infill-unit", choices=INFILL_UNITS, default=None,
                   help="with --task infill: what is masked (default: lines for code corpora, spans otherwise)")
    p.add_argument("--line-slot", type=int, default=None,
                   help=f"with whole lines: positions per masked line, filled with end-of-text after the line "
                        f"(default {DEFAULT_LINE_SLOT}; 0: each line's own length)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    p.set_defaults(handler=cmd_train)


def _add_sample_arguments(p: argparse.ArgumentParser) -> None:
    _add_checkpoint_sampling_arguments(p)
    p.add_argument("--switch-entropy", type=_switch_entropy, default=None, metavar="NATS|data|ode",
                   help="klflow hybrid: switch each sequence to randomized steps once its mean posterior entropy "
                        "is <= NATS, instead of at t_star; 'data' / 'ode' calibrate NATS as the mean entropy at "
                        "--t-star (default 0.28/0.3 of t_max) of validation sequences / of the sampler's own ODE")
    p.add_argument("--prompt", default=None, help="text every sample starts with (clamped at every step)")
    p.add_argument("--prompts", type=Path, default=None,
                   help='JSON lines, each with a "prompt" (and optionally a "reference"): -n replies to each')
    _add_records_output_arguments(p, "samples")
    p.set_defaults(handler=cmd_sample)


def _add_infill_arguments(p: argparse.ArgumentParser) -> None:
    _add_checkpoint_sampling_arguments(p)
    p.add_argument("text", nargs="?", default=None, help="the text with hole markers (or --file)")
    p.add_argument("--file", type=Path, default=None, help="read the text with hole markers from this file")
    _add_records_output_arguments(p, "filled texts")
    p.set_defaults(handler=cmd_infill)


def _add_trace_arguments(p: argparse.ArgumentParser) -> None:
    _add_checkpoint_sampling_arguments(p)
    p.add_argument("--prompt", default=None, help="text every sample starts with (clamped at every step)")
    p.add_argument("--out", "--output", dest="output", type=Path, default=Path("trace.html"), metavar="FILE",
                   help="the page to write")
    p.set_defaults(handler=cmd_trace)


def _add_checkpoint_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """What every command that samples a trained model takes: the checkpoint, the sampling options, --sampler."""
    p.add_argument("checkpoint", type=Path, help="a run directory or a checkpoint directory")
    _add_sampling_arguments(p)
    _add_sampler_argument(p)


def _add_records_output_arguments(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--out", "--output", dest="output", type=Path, default=None, metavar="FILE",
                   help=f"also write the {what} as JSON lines to this file")
    p.add_argument("--overwrite", action="store_true", help="let --out replace a file that is not a klflow samples file")


def _add_distill_arguments(p: argparse.ArgumentParser) -> None:
    _add_checkpoint_sampling_arguments(p)
    p.set_defaults(num_samples=32768)
    p.add_argument("--out", type=Path, required=True, help="the data folder to write (train with klflow train --data DIR)")
    p.add_argument("--data", type=Path, default=None,
                   help="the prepared data whose tokenizer and validation split are kept (default: the teacher's)")
    p.add_argument("--batch-size", type=int, default=128, help="teacher sequences per generate call")
    p.set_defaults(handler=cmd_distill)


def _add_eval_arguments(p: argparse.ArgumentParser) -> None:
    from klflow.evaluation.cli import add_eval_arguments

    add_eval_arguments(p)


def _add_bench_arguments(p: argparse.ArgumentParser) -> None:
    from klflow.bench.cli import add_bench_arguments

    add_bench_arguments(p)


def _add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=Path, help="a run directory or a checkpoint directory")
    p.add_argument("directory", type=Path, help="the folder to write (config.json, model.safetensors, "
                                                "tokenizer.json, state.json, README.md)")
    p.set_defaults(handler=cmd_export)


def _add_plot_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="a run directory (it holds metrics.jsonl)")
    p.add_argument("--out", "--output", type=Path, default=None, help="the PNG to write (default RUN/loss.png)")
    p.set_defaults(handler=cmd_plot)


def _add_calibrate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vocab-size", type=int, required=True, help="the vocabulary size V, special tokens included")
    p.add_argument("--beta", type=float, default=0.01, help="the path's beta (config path.beta)")
    p.add_argument("--confidence", type=float, default=0.98, help="P(argmax x_t = target) to reach")
    p.set_defaults(handler=cmd_calibrate)


def _add_quickstart_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--minutes", type=float, default=10.0, help="training budget in minutes")
    p.add_argument("--out", type=Path, default=None, help="run directory (default runs/quickstart-<time>)")
    _add_sampling_arguments(p)
    p.set_defaults(handler=cmd_quickstart)


def _add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    from klflow.flow import INTEGRATORS, WARPS
    from klflow.sampling import READOUTS

    p.add_argument("--sample-steps", "--steps", dest="steps", type=int, default=64, metavar="N",
                   help="sampler steps; NFE = steps + 1 with klflow's read-out")
    p.add_argument("--t-star", type=float, default=None, help="hybrid switch time in [0, t_max] (default 0.28/0.3 of t_max)")
    p.add_argument("--select", default=None, help="x1 choice in randomized steps: sample (at temperature 0.8; the randomized sampler's default) | argmax (the hybrid's default) | top_k:K")
    p.add_argument("--temperature", type=float, default=None,
                   help="temperature of the draws (sets the sampling option temperature; default: the method's, "
                        "0.8 for klflow's draws)")
    p.add_argument("--top-p", type=float, default=None,
                   help="draw from the smallest set of tokens holding this much probability (sets top_p; default 1: all)")
    p.add_argument("--top-k", type=int, default=None, help="draw from the K most probable tokens (sets top_k; default 0: all)")
    p.add_argument("--readout", choices=READOUTS, default=None, help="final choice at t_max (default argmax)")
    p.add_argument("--integrator", choices=INTEGRATORS, default=None, help="klflow ODE steps (default euler)")
    p.add_argument("--grid", choices=WARPS, default=None,
                   help="klflow: the time warp the steps are uniform in (default tau; alpha: uniform in "
                        "P(argmax x_t = x1); learned: the run's CDCD warp)")
    p.add_argument("--guidance", type=float, default=None, metavar="W",
                   help="klflow: classifier-free guidance weight with a prompt or holes; W != 0 makes two network "
                        "calls per step, cond + W (cond - uncond) (default 0: one call)")
    p.add_argument("--option", dest="options", action="append", default=[], metavar="KEY=VALUE",
                   help="a method-specific sampling option, e.g. --option cache=false (repeatable)")
    p.add_argument("-n", "--num-samples", type=int, default=4, help="how many samples (per prompt or text)")
    p.add_argument("--seq-len", type=int, default=None, help="length in tokens (default: the training length)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler's noise and draws")
    p.add_argument("--device", default="auto", help="'auto' (cuda when available), 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")


def _add_sampler_argument(p: argparse.ArgumentParser) -> None:
    from klflow.flow import SAMPLERS

    p.add_argument("--sampler", choices=SAMPLERS, default=None, help="klflow sampler (default randomized)")


def cmd_train(args: argparse.Namespace) -> int:
    from klflow.checkpoint import load_checkpoint
    from klflow.config import merge_settings, parse_overrides, read_config_file
    from klflow.train import train

    if args.resume and args.out is None:
        raise KLFlowError("--resume needs --out pointing at the run to continue")
    # A resumed run keeps its own config; only what this command line says changes it.
    base = load_checkpoint(args.out).experiment().to_dict() if args.resume else read_config_file(args.config)
    # The flags name single settings, so they win over a --set of the same key.
    settings = parse_overrides(args.overrides) | _train_flag_settings(args)
    if args.task or args.infill_unit or args.line_slot is not None:
        source = args.data or merge_settings(base, settings).data.source
        # The task's settings come first, so that an explicit --set still wins.
        settings = task_settings(args.task, source, args.infill_unit, args.line_slot) | settings
    config = merge_settings(base, settings)
    run_dir = args.out or _fresh_run_dir(Path(args.config).stem)
    result = train(config, run_dir, resume=args.resume, progress=not args.no_progress)
    _print_training(result)
    return 0


def _train_flag_settings(args: argparse.Namespace) -> dict[tuple[str, str], Any]:
    """The config settings `klflow train`'s own flags name (--data, --vocab-size, --method, --steps, --minutes)."""
    flags = {("data", "source"): args.data, ("data", "vocab_size"): args.vocab_size, ("method", "name"): args.method,
             ("train", "max_steps"): args.steps, ("train", "max_minutes"): args.minutes}
    return {key: value for key, value in flags.items() if value is not None}


def task_settings(task: str | None, source: str | None, unit: str | None,
                  line_slot: int | None) -> dict[tuple[str, str], Any]:
    """The data settings of a conditional training task (see `klflow train --help`), by (section, key)."""
    if task != "infill" and (unit or line_slot is not None):
        raise KLFlowError("--infill-unit and --line-slot go with --task infill")
    if task == "pairs":
        return {("data", "layout"): "pairs"}
    unit = unit or ("lines" if _is_code(source) else "spans")
    if line_slot is not None and (unit != "lines" or line_slot < 0):
        raise KLFlowError(f"--line-slot must be >= 0 and goes with whole-line masks (--infill-unit lines), got {line_slot}")
    slot = DEFAULT_LINE_SLOT if line_slot is None else line_slot
    return {("data", "layout"): "infill", ("data", "unit"): unit} | (
        {("data", "line_slot"): slot} if unit == "lines" and slot else {})


def _is_code(source: str | None) -> bool:
    return source in CODE_CORPORA or (source is not None and source.endswith(".py"))


def cmd_sample(args: argparse.Namespace) -> int:
    from klflow.trained import TrainedModel

    _check_samples_output(args.output, args.overwrite)
    if args.prompts is not None or args.prompt is not None:
        return _sample_prompts(args)
    model = TrainedModel(args.checkpoint, args.device)
    texts, ids, info = _sample(model, args, _sample_options(args))
    for i, text in enumerate(texts):
        print(f"--- sample {i} ({info.get('sampler') or info['method']}, NFE {info['nfe']}) ---\n{text}")
    if args.output:
        _write_samples(args.output, texts, ids, info)
        print(f"wrote {len(texts)} samples to {args.output}")
    return 0


def _sample_prompts(args: argparse.Namespace) -> int:
    """`klflow sample --prompt/--prompts`: -n replies to a prompt, or to each prompt of a JSON-lines file."""
    from klflow.evaluation.samples import read_prompts
    from klflow.infill import continuation
    from klflow.trained import TrainedModel

    if args.prompt is not None and args.prompts is not None:
        raise KLFlowError("give --prompt or --prompts, not both")
    requests = read_prompts(args.prompts) if args.prompts is not None else [{"prompt": _valid_text(args.prompt, "--prompt")}]
    model = TrainedModel(args.checkpoint, args.device)
    setup = model.sampler(args.steps, args.seed, args.seq_len, print, **_sample_options(args))
    _check_sampling_request(model, setup.seq_len, args)
    templates = [continuation(r["prompt"], model.tokenizer, setup.seq_len) for r in requests]
    with _progress(args, len(templates), "prompts") as bar:
        results = setup.fill(templates, args.num_samples, args.steps, args.seed, progress=bar.update)
    records = []
    for number, (request, samples) in enumerate(zip(requests, results)):
        for i, sample in enumerate(samples):
            print(f"--- prompt {number} sample {i} ({setup.info.get('sampler') or setup.info['method']}, NFE {sample.nfe}) ---"
                  f"\n{request['prompt']}\n>>> {sample.fills[0]}")
            records.append({"prompt": request["prompt"], "sample": sample.fills[0],
                            **({"reference": request["reference"]} if "reference" in request else {}),
                            "text": sample.text, "ids": list(sample.ids), **setup.info, "nfe": sample.nfe})
    if args.output:
        _write_records(args.output, records)
        print(f"wrote {len(records)} samples ({len(requests)} prompts x {args.num_samples}) to {args.output}")
    return 0


def cmd_infill(args: argparse.Namespace) -> int:
    from klflow.infill import parse as parse_holes
    from klflow.trained import TrainedModel

    _check_samples_output(args.output, args.overwrite)
    if (args.text is None) == (args.file is None):
        raise KLFlowError("give the text with hole markers as an argument or with --file (one of them)")
    if args.file is not None:
        try:
            text = args.file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise KLFlowError(f"cannot read {args.file}: {err}") from None
    else:
        text = _valid_text(args.text, "the text")
    model = TrainedModel(args.checkpoint, args.device)
    template = parse_holes(text, model.tokenizer)
    setup = model.sampler(args.steps, args.seed, args.seq_len, print, **_sample_options(args))
    _check_sampling_request(model, setup.seq_len, args)
    with _progress(args, 1, "texts") as bar:
        (samples,) = setup.fill([template], args.num_samples, args.steps, args.seed, progress=bar.update)
    for i, sample in enumerate(samples):
        print(f"--- filling {i} ({len(template.holes)} holes, NFE {sample.nfe}) ---\n{sample.text}")
    if args.output:
        _write_records(args.output, [{"input": text, "text": s.text, "fills": list(s.fills), "ids": list(s.ids),
                                      **setup.info, "nfe": s.nfe} for s in samples])
        print(f"wrote {len(samples)} filled texts to {args.output}")
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    from klflow.infill import continuation
    from klflow.outputs import check_output_file
    from klflow.trace import record_trace, write_trace_page
    from klflow.trained import TrainedModel

    check_output_file(args.output, "--out")
    model = TrainedModel(args.checkpoint, args.device)
    setup = model.sampler(args.steps, args.seed, args.seq_len, print, **_sample_options(args))
    _check_sampling_request(model, setup.seq_len, args)
    prompt = None if args.prompt is None else _valid_text(args.prompt, "--prompt")
    template = None if prompt is None else continuation(prompt, model.tokenizer, setup.seq_len)
    with _progress(args, args.steps, f"trace ({setup.info.get('sampler') or setup.info['method']})", "step") as bar:
        trace = record_trace(setup, args.num_samples, args.steps, args.seed, template, lambda _: bar.update())
    write_trace_page(trace, args.output)
    print(f"wrote {args.output}: {len(trace['frames'])} frames of {args.num_samples} sequences "
          f"({trace['method']}, NFE {trace['frames'][-1]['nfe']}); open it in a browser")
    return 0


def _check_sampling_request(model: TrainedModel, seq_len: int, args: argparse.Namespace) -> None:
    """Before any sampling: the sizes and the seed in range, a warning past the trained length, and memory."""
    if not 0 <= args.seed < 2**63:
        raise KLFlowError(f"--seed must lie in [0, 2**63), got {args.seed}")
    trained = model.checkpoint.experiment().train.seq_len
    if seq_len > trained:
        print(f"warning: --seq-len {seq_len} is past the {trained} tokens the model was trained on; "
              "expect worse text", file=sys.stderr)
    _check_memory(args.num_samples, seq_len, model.checkpoint, model.device)


def _check_samples_output(file: Path | None, overwrite: bool) -> None:
    """Before any sampling: --out can be written, and replaces nothing but an earlier samples file."""
    from klflow.evaluation.samples import is_samples_file
    from klflow.outputs import check_output_file

    if file is None:
        return
    check_output_file(file, "--out")
    if file.is_file() and file.stat().st_size and not overwrite and not is_samples_file(file):
        raise KLFlowError(f"--out {file} exists and is not a klflow samples file; pass --overwrite to replace it")


def _valid_text(text: str, where: str) -> str:
    """text with lone surrogates (bytes of the command line that are not UTF-8) replaced by U+FFFD."""
    from klflow.data.corpus import replace_surrogates

    text, replaced = replace_surrogates(text)
    if replaced:
        print(f"warning: {replaced} undecodable characters in {where} were replaced by U+FFFD", file=sys.stderr)
    return text


def _check_memory(rows: int, seq_len: int, ckpt: Checkpoint, device: torch.device) -> None:
    """Refuse, before allocating, a generation whose [rows, seq_len, V] buffers cannot fit in memory.

    A sampler holds a few such buffers at once (the state x_t, float32 logits, the float64 logits
    and CDF of the draws): SAMPLING_BYTES per entry, plus the network's activations per token.
    """
    import torch

    architecture = ckpt.config["architecture"]
    per_token = SAMPLING_BYTES * architecture["vocab_size"] + 16 * architecture["d_model"] * architecture["mlp_ratio"]
    needed = rows * seq_len * per_token
    if device.type == "cuda":
        available = torch.cuda.get_device_properties(device).total_memory
    else:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > available:
        raise KLFlowError(f"sampling {rows:,} x {seq_len:,} tokens at V={architecture['vocab_size']} needs about "
                          f"{needed / 2**30:,.0f} GiB, more than the {available / 2**30:,.0f} GiB of {device.type}; "
                          "lower --num-samples or --seq-len")


def _write_records(file: Path, records: list[dict]) -> None:
    from klflow.outputs import write_atomic

    file.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(file, "".join(json.dumps(record) + "\n" for record in records))


def cmd_distill(args: argparse.Namespace) -> int:
    from klflow.distill import distill
    from klflow.trained import TrainedModel

    teacher = TrainedModel(args.checkpoint, args.device)
    started = time.perf_counter()
    with _progress(args, args.num_samples, "distill", "sequence") as bar:
        data = distill(teacher, args.out, args.num_samples, steps=args.steps, seed=args.seed, seq_len=args.seq_len,
                       batch_size=args.batch_size, data=args.data, progress=lambda done: bar.update(done - bar.n),
                       **_sample_options(args))
    m, seconds = data.meta, time.perf_counter() - started
    print(f"distilled {args.num_samples} sequences of {teacher.method} ({m['derived_from']['sampler'].get('temperature')} "
          f"temperature) into {m['n_train_documents']:,} documents, {m['n_train_tokens']:,} train tokens; "
          f"validation: {m['n_val_documents']} documents of {m['derived_from']['validation_from']} -> {data.dir} "
          f"({seconds:.0f}s); train a student: klflow train --data {data.dir}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from klflow.trained import TrainedModel

    model = TrainedModel(args.checkpoint, "cpu")
    model.save_pretrained(args.directory)
    print(f"wrote {model.checkpoint.dir} to {args.directory} in the Hub's format; klflow.load({str(args.directory)!r}) "
          f"reads it, `hf upload REPO_ID {args.directory}` publishes it")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from klflow.metrics import plot_metrics

    file = plot_metrics(args.run, args.out or args.run / "loss.png")
    print(f"wrote {file}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from klflow.flow import KLPath, argmax_probability, calibrate_t_max

    t_max = calibrate_t_max(args.vocab_size, args.beta, args.confidence)
    path = KLPath(args.vocab_size, args.beta, t_max)
    print(f"V={args.vocab_size} beta={args.beta}: t_max={t_max} (P(argmax x_t = target) = "
          f"{argmax_probability(args.vocab_size, args.beta, t_max):.4f}), tau_max={path.tau_max:.4f}, "
          f"default t_star={path.default_t_star}")
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from klflow.config import merge_settings, read_config_file
    from klflow.flow import SAMPLERS
    from klflow.metrics import plot_metrics
    from klflow.train import train
    from klflow.trained import TrainedModel

    started = time.perf_counter()
    config = merge_settings(read_config_file("quickstart"), {("train", "max_minutes"): args.minutes})
    run_dir = args.out or _fresh_run_dir("quickstart")
    print(f"klflow quickstart: chit-chat, {args.minutes:g} minutes of CPU training -> {run_dir}")
    result = train(config, run_dir, progress=not args.no_progress)
    _print_training(result)
    model = TrainedModel(result.checkpoint, args.device)
    readable = []
    for sampler in SAMPLERS:
        texts, ids, info = _sample(model, args, _sample_options(args) | {"sampler": sampler})
        _write_samples(run_dir / f"samples-{sampler}.jsonl", texts, ids, info)
        readable.append(f"=== {sampler} (NFE {info['nfe']}, select={info['select']}, readout={info['readout']}"
                        + (f", t_star={info['t_star']}" if sampler == "hybrid" else "") + ") ===\n"
                        + "".join(f"[{i}] {text.strip()}\n" for i, text in enumerate(texts)))
        print("\n" + readable[-1], end="")
    samples_file = run_dir / "samples.txt"
    samples_file.write_text("\n".join(readable))
    plot = plot_metrics(run_dir, run_dir / "loss.png")
    print(f"\nvalidation loss {result.val_loss:.4f} nats/token; quickstart took {(time.perf_counter() - started) / 60:.1f} min\n"
          f"samples: {samples_file} (records for `klflow eval`: {run_dir}/samples-*.jsonl)\nloss plot: {plot}")
    return 0


def _fresh_run_dir(name: str) -> Path:
    return Path("runs") / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _sample_options(args: argparse.Namespace) -> dict:
    """The sampler options the user set on the command line (None: not set); TrainedModel.sampler reads
    them (klflow.trained.sampler_options) and the method supplies the rest."""
    from klflow.config import parse_assignment

    given = {"sampler": getattr(args, "sampler", None), "t_star": args.t_star, "select": args.select,
             "readout": args.readout, "integrator": args.integrator, "grid": args.grid, "switch_entropy": getattr(args, "switch_entropy", None),
             "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
             "guidance": getattr(args, "guidance", None)}
    return given | dict(parse_assignment(item) for item in args.options)


def _sample(model: TrainedModel, args: argparse.Namespace, options: dict) -> tuple[list[str], torch.Tensor, dict]:
    """args.num_samples texts from nothing, after the checks, with the sampler's progress display."""
    setup = model.sampler(args.steps, args.seed, args.seq_len, print, **options)
    _check_sampling_request(model, setup.seq_len, args)
    loop = (setup.seq_len, "token") if setup.method.causal else (args.steps, "step")  # what progress() counts
    with _progress(args, loop[0], f"sample ({setup.info.get('sampler') or setup.info['method']})", loop[1]) as bar:
        return model.sample_from(setup, args.num_samples, lambda _: bar.update())


def _switch_entropy(text: str) -> float | str:
    """--switch-entropy: a number of nats, or a calibration source."""
    from klflow.flow import SWITCH_CALIBRATIONS

    if text in SWITCH_CALIBRATIONS:
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of nats, 'data' or 'ode', got {text!r}") from None


def _progress(args: argparse.Namespace, total: int, desc: str, unit: str = "it") -> tqdm | ProgressLines:
    """The progress display of a sampling command (klflow.progress), off with --no-progress."""
    from klflow.progress import progress_bar

    return progress_bar(total, desc, unit, disable=args.no_progress, leave=False)


def _write_samples(file: Path, texts: list[str], ids: torch.Tensor, info: dict) -> None:
    _write_records(file, [{"text": text, "ids": row, **info} for text, row in zip(texts, ids.tolist())])


def _print_training(result) -> None:
    val = f"{result.val_loss:.4f}" if result.val_loss is not None else "n/a"
    if result.history and "val_loss_free" in result.history[-1]:
        val += f" (generated positions only: {result.history[-1]['val_loss_free']:.4f})"
    print(f"trained {result.steps} steps, {result.tokens:,} tokens in {result.train_seconds / 60:.1f} min "
          f"({result.tokens_per_second:,.0f} tokens/s); validation loss {val}; checkpoint {result.checkpoint}"
          + (f"; {result.skipped_steps} non-finite steps skipped" if result.skipped_steps else ""))


if __name__ == "__main__":
    sys.exit(main())
