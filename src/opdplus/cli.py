"""The `opdplus` command line. Each subcommand parses its flags and calls into the library.

Errors a user can fix (bad values, missing files, a run directory in use) are printed as one line and exit
with status 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import typing
from pathlib import Path

from opdplus.config import TrainConfig, load_yaml_config


def _exact(args: argparse.Namespace) -> None:
    """Exact check on an enumerable tabular student: how far each estimator's expected step is from the truth."""
    from opdplus.divergences import get_divergence
    from opdplus.tabular import TabularProblem, cosine, relative_error

    names = [get_divergence(name).name for name in args.divergences.split(",")]  # fail before printing
    problem = TabularProblem(vocab=args.vocab, length=args.length, seed=args.seed)
    print(f"tabular student: vocabulary {args.vocab}, length {args.length}, {len(problem.sequences)} sequences "
          f"enumerated exactly (float64), seed {args.seed}")
    print(f"{'divergence':<12} {'gamma':>5}  {'opd rel.err':>11} {'opd cos':>8}  {'opd+ rel.err':>12} {'opd+ cos':>8}")
    for name in names:
        for gamma in (0.0, 1.0):
            truth = problem.true_gradient(name, gamma)
            opd = problem.expected_descent_direction(name, "opd", gamma)
            plus = problem.expected_descent_direction(name, "opd+", gamma)
            print(f"{name:<12} {gamma:>5g}  {relative_error(opd, truth):>11.3g} {cosine(opd, truth):>8.3f}  "
                  f"{relative_error(plus, truth):>12.1e} {cosine(plus, truth):>8.3f}")
    print("rel.err = |E[estimate] - true gradient| / |true gradient|; cos < 0 means the step goes uphill.")


def _train(args: argparse.Namespace) -> None:
    from opdplus.trainer import train

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under `accelerate launch`: set up the process group
        from accelerate import PartialState

        PartialState()

    values = load_yaml_config(args.config) if args.config else {}
    values.update({name: getattr(args, name) for name in TrainConfig.field_names() if getattr(args, name, None) is not None})
    config = TrainConfig(**values)
    last = train(config, progress=not args.no_progress)
    print(f"done: step {last['step']}, outputs in {config.out} (metrics.jsonl, final/)")


def _eval(args: argparse.Namespace) -> None:
    from opdplus.evaluation import evaluate_model
    from opdplus.tasks import get_task

    task = get_task(args.task, test_data=args.data, question_field=args.question_field,
                    answer_field=args.answer_field, max_new_tokens=args.max_new_tokens)
    if args.tools:
        from opdplus.tasks.withtools import WithTools
        from opdplus.tools import load_tools

        task = WithTools(task, load_tools(args.tools), args.max_tool_turns)
    examples = task.examples("test", args.limit, seed=args.seed) if args.limit else _all_test_examples(task, args)
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not args.overwrite:
        raise ValueError(f"--out {out} exists; pick another file or pass --overwrite")
    if out is not None:  # fail now, not after the whole evaluation
        existing = next(parent for parent in [out.parent.absolute(), *out.parent.absolute().parents] if parent.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK):
            raise ValueError(f"--out {out}: {existing} is not a writable directory")
    summary = evaluate_model(args.model, task, examples, k=args.k, batch_size=args.batch_size, out=out,
                             progress=not args.no_progress)
    width = max(len(key) for key in summary)
    print(f"{args.model} on {args.task}" + (f" ({args.data})" if args.data else ""))
    for key, value in summary.items():
        print(f"  {key:<{width}}  {value:.4f}" if isinstance(value, float) else f"  {key:<{width}}  {value}")
    if out is not None:
        print(f"per-example results: {out}")


def _all_test_examples(task, args) -> list:
    """Every record of a data file once, in file order; the built-in tasks draw `--limit` (default 500)."""
    if hasattr(task, "load"):
        return list(task.load("test"))
    return task.examples("test", 500, seed=args.seed)


def _demo(args: argparse.Namespace) -> None:
    from opdplus.demo import run_demo

    tasks = args.tasks.split(",") if args.tasks else (["arith"] if args.quick else ["arith", "toolcall"])
    divergences, estimators = args.divergences.split(","), args.estimators.split(",")
    out = Path(args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    if (out / "results.json").exists() and not args.overwrite:
        raise ValueError(f"--out {out} already holds demo results; pick another directory or pass --overwrite")
    overrides = dict(parse_assignment(item) for item in args.set)
    overrides.update({"steps": args.steps} if args.steps else {})
    overrides.update({"lr": args.lr} if args.lr else {})
    for name in divergences:
        TrainConfig(divergence=name).validate()
    for name in estimators:
        TrainConfig(estimator=name).validate()
    run_demo(out, tasks=tasks, divergences=divergences, estimators=estimators, quick=args.quick, seed=args.seed,
             workers=args.workers, overrides=overrides)


def parse_assignment(text: str) -> tuple[str, object]:
    """`ppo_epochs=4` -> ("ppo_epochs", 4), typed like the TrainConfig field."""
    name, separator, value = text.partition("=")
    name = name.strip().replace("-", "_")
    if not separator or name not in TrainConfig.field_names():
        raise ValueError(f"--set {text!r}: expected FIELD=VALUE with FIELD one of {', '.join(TrainConfig.field_names())}")
    kind = typing.get_type_hints(TrainConfig)[name]
    base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
    if value.lower() in ("none", "off") and base is not kind:
        return name, None
    if base is bool:
        return name, value.lower() in ("1", "true", "yes", "on")
    try:
        return name, base(value)
    except ValueError:
        raise ValueError(f"--set {text!r}: {value!r} is not a valid {base.__name__}") from None


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (--prompts-per-step, --no-tensorboard, ...); unset flags keep defaults."""
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        if kind is bool:
            parser.add_argument(flag, dest=field.name, action="store_true", default=None)
            if field.default:
                parser.add_argument("--no-" + field.name.replace("_", "-"), dest=field.name, action="store_false")
            continue
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        if base is dict or typing.get_origin(base) is dict:  # several teachers: only in a --config YAML file
            continue
        parser.add_argument(flag, dest=field.name, type=_optional(base) if base is not kind else base, default=None,
                            metavar=field.name.upper(), help=f"default: {field.default}")


def _optional(cast):
    def parse(text: str):
        return None if text.lower() in ("none", "off") else cast(text)

    parse.__name__ = cast.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks on errors")
    parser = argparse.ArgumentParser(prog="opdplus", parents=[common],
                                     description="On-policy distillation with exact f-divergence advantages.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", parents=[common], help="every divergence x estimator on the built-in tiny models; table + plot")
    demo.add_argument("--quick", action="store_true", help="fewer steps, arith only: a smoke run of a few minutes")
    demo.add_argument("--tasks", default=None, help="comma-separated (default: arith,toolcall; arith with --quick)")
    demo.add_argument("--divergences", default="rkl,fkl,jsd")
    demo.add_argument("--estimators", default="opd,opd+")
    demo.add_argument("--steps", type=int, default=None, help="override the number of steps per arm")
    demo.add_argument("--lr", type=float, default=None, help="override the learning rate")
    demo.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="override any training setting for every arm, e.g. --set ppo_epochs=4 (repeatable)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--workers", type=int, default=2, help="arms trained at once (one CPU thread each)")
    demo.add_argument("--out", default=None, help="output directory (default: runs/demo-<time>)")
    demo.add_argument("--overwrite", action="store_true")
    demo.set_defaults(run=_demo)

    train = commands.add_parser("train", parents=[common], help="distill a teacher into a student")
    train.add_argument("--config", help="YAML file of settings; flags given on the command line override it")
    _add_config_flags(train)
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(run=_train)

    evaluate = commands.add_parser("eval", parents=[common], help="accuracy of a model on a task (table + JSONL)")
    evaluate.add_argument("--model", required=True, help="model directory, tiny: name or hub id")
    evaluate.add_argument("--task", required=True, help="arith, toolcall, mix, math or tooluse")
    evaluate.add_argument("--data", help="evaluation data for math / tooluse (JSONL, JSON or Parquet)")
    evaluate.add_argument("--question-field", default="question")
    evaluate.add_argument("--answer-field", default="answer")
    evaluate.add_argument("--max-new-tokens", type=int, default=None, help="per assistant turn")
    evaluate.add_argument("--tools", help="tools the model may call: a built-in set (arithmetic) or module:attribute")
    evaluate.add_argument("--max-tool-turns", type=int, default=4)
    evaluate.add_argument("--k", type=int, default=0, help="also sample k responses per prompt: avg@k, pass@k")
    evaluate.add_argument("--limit", type=int, default=None, help="evaluate this many examples (default: all)")
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--out", help="per-example JSONL (prompt, output, verdict)")
    evaluate.add_argument("--overwrite", action="store_true")
    evaluate.add_argument("--no-progress", action="store_true")
    evaluate.set_defaults(run=_eval)

    exact = commands.add_parser("exact", parents=[common], help="compare opd and opd+ with the exact gradient on a tabular student")
    exact.add_argument("--divergences", default="rkl,fkl,jsd,hellinger,chi2,alpha:0.5")
    exact.add_argument("--vocab", type=int, default=3)
    exact.add_argument("--length", type=int, default=3)
    exact.add_argument("--seed", type=int, default=0)
    exact.set_defaults(run=_exact)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # per-file loading bars drown the run's own progress
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, OSError, RuntimeError, ImportError) as error:
        if getattr(args, "debug", False):
            raise
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"opdplus {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"opdplus {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
