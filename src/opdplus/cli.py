"""The `opdplus` command line. Each subcommand parses its flags and calls into the library.

Flags, `--config` YAML files and `opdplus demo --set FIELD=VALUE` are typed by jsonargparse from TrainConfig's
fields, whose own sentences are the `--help`. Errors a user can fix (bad values, missing files, a run directory
in use) are printed as one line and exit with status 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import sys
import time
import types
import typing
from pathlib import Path
from typing import NoReturn

import yaml
from jsonargparse import ActionYesNo, ArgumentParser, Namespace, get_loader, set_loader
from jsonargparse.typing import register_type

from opdplus.config import TrainConfig

FLAG_VALUES = "opdplus"  # jsonargparse parser mode: how a flag's text is read before its type is checked
YAML_ONLY = ("teachers",)  # settings with no flag: a mapping is written in a --config file


def _read_flag_value(text: str):
    """YAML, as jsonargparse reads flag values, except that `none` and `off` unset an optional setting."""
    return None if text.strip().lower() in ("none", "off") else get_loader("yaml")(text)


set_loader(FLAG_VALUES, _read_flag_value, exceptions=(yaml.YAMLError,))


class Float(float):
    """A float setting read as Python reads floats (`nan`, `inf`, `1e-3`): jsonargparse reads YAML floats, where
    `nan` is text, and a NaN must reach TrainConfig.validate() to be refused by name."""


def _to_float(value) -> float:
    """float() of a number or text, but not of a bool: `lr: true` is a mistake, not 1.0."""
    if not isinstance(value, bool):
        with contextlib.suppress(TypeError, ValueError):
            return float(value)
    raise ValueError(f"Expected a float. Got value: {value}")


register_type(Float, serializer=float, deserializer=_to_float)


class CommandParser(ArgumentParser):
    """jsonargparse's parser, failing as argparse does: the usage, then ONE line `opdplus <cmd>: error: ...`."""

    def __init__(self, **kwargs):
        super().__init__(parser_mode=FLAG_VALUES, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        parser = getattr(ex, "subcommand_parser", None) or self
        missing = re.match(r"the following arguments are required: (\w+)\.", message)
        subcommands = {name: sub for action in parser._actions if isinstance(action.choices, dict)
                       for name, sub in action.choices.items()}
        if missing and missing[1] in subcommands:  # checked here, reported as the subcommand's: --model, not eval.model
            parser = subcommands[missing[1]]
            keys = message.split(": ", 1)[1].split(", ")
            message = "the following arguments are required: " + ", ".join(
                _flags(parser).get(key.partition(".")[2], key) for key in keys)
        argparse.ArgumentParser.error(parser, _argparse_message(parser, message))


def _flags(parser: ArgumentParser) -> dict[str, str]:
    """dest -> the flag that sets it."""
    return {action.dest: action.option_strings[0] for action in parser._actions if action.option_strings}


def _argparse_message(parser: ArgumentParser, message: str) -> str:
    """jsonargparse's `Parser key "steps": Expected a <class 'int'>. Got value: many` as argparse words it,
    `argument --steps: invalid int value: 'many'`; other messages are cut to their first line."""
    invalid = re.match(r'Parser key "([^"]+)":.*?(?:<class \'|Not of type )(?:[\w.]*\.)?(\w+).*'
                       r'(?:Got|Given) value: ([^\n]*)', message, re.S)
    if invalid and invalid[1] in _flags(parser):
        return f"argument {_flags(parser)[invalid[1]]}: invalid {invalid[2].lower()} value: {invalid[3]!r}"
    return message.strip().splitlines()[0]


# ---- TrainConfig as flags, YAML files and FIELD=VALUE ---------------------------------------------------------


def add_settings(parser: ArgumentParser, *, flags_only: bool) -> None:
    """One flag per TrainConfig field (--prompts-per-step, --tensorboard/--no-tensorboard, ...), listed under
    the field's group with the field's sentence; `flags_only` leaves out the YAML-only settings."""
    hints = typing.get_type_hints(TrainConfig)
    groups = {}
    for field in dataclasses.fields(TrainConfig):
        if flags_only and field.name in YAML_ONLY:
            continue
        if field.metadata["group"] not in groups:
            groups[field.metadata["group"]] = parser.add_argument_group(field.metadata["group"])
        group = groups[field.metadata["group"]]
        flag, kind = "--" + field.name.replace("_", "-"), hints[field.name]
        if kind is bool:
            group.add_argument(flag, action=ActionYesNo(no_prefix="no-"), default=field.default,
                               help=field.metadata["help"])
        else:
            group.add_argument(flag, type=_python_floats(kind), default=field.default,
                               metavar=field.name.upper(), help=field.metadata["help"])


def _python_floats(kind):
    """`kind` with float read as Python reads it: `float | None` -> `Float | None`."""
    if kind is float:
        return Float
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return typing.Union[tuple(_python_floats(arg) for arg in typing.get_args(kind))]
    return kind


def settings_parser() -> ArgumentParser:
    """Every TrainConfig field, YAML-only ones included: types the values of a config file and of `--set`."""
    parser = ArgumentParser(parser_mode=FLAG_VALUES, exit_on_error=False, add_help=False)
    add_settings(parser, flags_only=False)
    return parser


def _typed(parser: ArgumentParser, name: str, value):
    """`value` as TrainConfig field `name` holds it; ValueError when jsonargparse refuses its type."""
    try:
        return parser.parse_object({name: value}, defaults=False)[name]
    except argparse.ArgumentError:
        raise ValueError(name) from None


def _type_names(name: str) -> str:
    kind = typing.get_type_hints(TrainConfig)[name]
    return " or ".join("null" if t is type(None) else t.__name__ for t in typing.get_args(kind) or (kind,))


class _PlainYamlLoader(yaml.SafeLoader):
    """Composes a config file, refusing anchors and aliases as the parser meets them: an alias is a shared node,
    and a few nested ones ("billion laughs") expand to gigabytes once constructed or type-checked."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(None, None, "YAML anchors and aliases are not supported (write the "
                                              "value out)", event.start_mark)
        return super().compose_node(parent, index)


def _key_kind(node: yaml.Node) -> str | None:
    """None for a plain-text mapping key, else what it is instead (`[a, b]`, `{a: 1}`, `!!int 5`)."""
    if isinstance(node, yaml.SequenceNode):
        return "a sequence"
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if node.tag != "tag:yaml.org,2002:str":
        return f"a value tagged {node.tag.replace('tag:yaml.org,2002:', '!!')}"
    return None


def load_yaml_config(path: str | Path) -> dict:
    """Read a run config: a YAML mapping of TrainConfig fields. Unknown keys and wrong types are reported as
    `file:line: ...` so that a typo cannot silently fall back to a default."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        root = yaml.compose(path.read_text(), Loader=_PlainYamlLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ValueError(f"{where}: invalid YAML: {getattr(error, 'problem', error)}") from None
    if root is None:
        return {}
    if not isinstance(root, yaml.MappingNode):
        raise ValueError(f"{path}:{root.start_mark.line + 1}: expected a mapping of settings")
    names = [field.name for field in dataclasses.fields(TrainConfig)]
    parser, values = settings_parser(), {}
    for key_node, value_node in root.value:
        key, line = key_node.value, key_node.start_mark.line + 1
        if _key_kind(key_node):
            raise ValueError(f"{path}:{line}: a setting name must be plain text, got {_key_kind(key_node)}")
        if key not in names:
            raise ValueError(f"{path}:{line}: unknown key {key!r}; valid keys: {', '.join(names)}")
        if key in values:
            raise ValueError(f"{path}:{line}: duplicate key {key!r}")
        try:  # safe_load: tags such as !!python/object are refused, never constructed
            value = yaml.safe_load(yaml.serialize(value_node))
        except yaml.YAMLError as error:
            raise ValueError(f"{path}:{line}: {key}: {getattr(error, 'problem', None) or error}") from None
        try:
            values[key] = _typed(parser, key, value)
        except ValueError:
            raise ValueError(f"{path}:{line}: {key} must be {_type_names(key)}, got {value!r}") from None
    return values


def parse_assignment(text: str) -> tuple[str, object]:
    """`ppo_epochs=4` -> ("ppo_epochs", 4), typed like the TrainConfig field."""
    names = [field.name for field in dataclasses.fields(TrainConfig)]
    name, separator, value = text.partition("=")
    name = name.strip().replace("-", "_")
    if not separator or name not in names:
        raise ValueError(f"--set {text!r}: expected FIELD=VALUE with FIELD one of {', '.join(names)}")
    try:
        return name, _typed(settings_parser(), name, value)
    except ValueError:
        kind = _type_names(name).split(" or ")[0]
        raise ValueError(f"--set {text!r}: {value!r} is not a valid {kind}") from None


# ---- the subcommands -----------------------------------------------------------------------------------------


def _exact(args: Namespace) -> None:
    """Exact check on an enumerable tabular student: how far each estimator's expected step is from the truth."""
    import math

    from opdplus.objective import get_divergence
    from opdplus.tabular import TabularProblem, cosine, relative_error

    names = [get_divergence(name).name for name in args.divergences.split(",")]  # fail before printing
    try:
        top_ks = [int(k) for k in args.top_k.split(",") if k.strip()]
    except ValueError:
        raise ValueError(f"--top-k must be comma-separated integers, got {args.top_k!r}") from None
    if any(not 1 <= k < args.vocab for k in top_ks):
        raise ValueError(f"--top-k values must be between 1 and --vocab - 1 = {args.vocab - 1}, got {args.top_k}")
    if not (math.isfinite(args.reward_weight) and args.reward_weight >= 0):
        raise ValueError(f"--reward-weight must be a finite number >= 0, got {args.reward_weight}")
    problem = TabularProblem(vocab=args.vocab, length=args.length, seed=args.seed)
    reward = args.reward_weight
    print(f"tabular student: vocabulary {args.vocab}, length {args.length}, {len(problem.sequences)} sequences "
          f"enumerated exactly (float64), seed {args.seed}")
    columns = ["opd", "opd cos", "opd+", "dense"]
    for k in top_ks:
        columns += [f"topk:{k}", f"topk:{k} vs D"]
    if reward:
        columns += ["opd+ +λR", "dense +λR"]
    widths = [max(9, len(column)) for column in columns]
    print(f"{'divergence':<12} {'gamma':>5}  " + " ".join(f"{c:>{w}}" for c, w in zip(columns, widths)))
    for name in names:
        for gamma in (0.0, 1.0):
            truth = problem.true_gradient(name, gamma)
            opd = problem.expected_descent_direction(name, "opd", gamma)
            values = [f"{relative_error(opd, truth):.3g}", f"{cosine(opd, truth):.3f}"]
            for estimator in ("opd+", "dense"):
                step = problem.expected_descent_direction(name, estimator, gamma)
                values.append(f"{relative_error(step, truth):.1e}")
            for k in top_ks:
                coarse = problem.true_gradient(name, gamma, top_k=k)
                top = problem.expected_descent_direction(name, f"topk:{k}", gamma)
                values += [f"{relative_error(top, coarse):.1e}", f"{relative_error(coarse, truth):.3g}"]
            if reward:
                mixed = problem.true_gradient(name, gamma, reward_weight=reward)
                for estimator in ("opd+", "dense"):
                    step = problem.expected_descent_direction(name, estimator, gamma, reward_weight=reward)
                    values.append(f"{relative_error(step, mixed):.1e}")
            print(f"{name:<12} {gamma:>5g}  " + " ".join(f"{v:>{w}}" for v, w in zip(values, widths)))
    print("rel.err = |E[step] - true gradient| / |true gradient| of the estimator's own objective; opd cos < 0: "
          "the step goes uphill.\n"
          "opd, opd+, dense: objective D. topk:K: D_K, the divergence over the teacher's K likeliest tokens plus one "
          "tail bucket.\n"
          "topk:K vs D = |grad D_K - grad D| / |grad D|: how far that coarser objective is from D (not an error).")
    if reward:
        print(f"+λR: objective λ E[R] - D, λ = {reward:g}, R(y) a fixed seeded 0/1 reward per sequence; advantage R "
              "minus the leave-one-out\nbaseline over a group of 2 samples, every pair enumerated (a baseline does "
              "not change E[R grad log p]: still exact).")


def _train(args: Namespace) -> None:
    from opdplus.trainer import train

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1  # under `accelerate launch`
    if launched:  # set up the process group (one process has none; a vLLM engine may make its own)
        from accelerate import PartialState

        PartialState()

    config = TrainConfig(**{field.name: args[field.name] for field in dataclasses.fields(TrainConfig)
                            if field.name in args})
    try:
        last = train(config, progress=not args.no_progress)
        if launched:
            _leave_process_group(finished=True)
    finally:  # after an error no barrier: the other processes may never reach it
        if launched:
            _leave_process_group(finished=False)
    print(f"done: step {last['step']}, outputs in {config.out} (metrics.jsonl, final/)")
    if launched:
        exit_now()


def _leave_process_group(finished: bool) -> None:
    """Close the launch's process group (after a finished run, once every process got there)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def exit_now() -> None:
    """End a launched process once everything is written: the interpreter's own teardown of the communication
    libraries' native objects can abort the process ("terminate called without an active exception": seen twice
    under DeepSpeed on CPU in fresh CI environments, once after the process group was destroyed; never in 18 local
    repeats), turning a finished run into a failed launch. Files are closed by then; stdout and stderr are flushed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _eval(args: Namespace) -> None:
    from opdplus.build import build_task
    from opdplus.rollout.evaluation import evaluate_model
    from opdplus.tasks import DATA_TASKS

    if args.task in DATA_TASKS and args.data is None:
        raise ValueError(f"task {args.task!r} reads a data file: pass --data FILE")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be a positive integer, got {args.limit}")
    task = build_task(TrainConfig(task=args.task, test_data=args.data, question_field=args.question_field,
                                  answer_field=args.answer_field, max_new_tokens=args.max_new_tokens,
                                  tools=args.tools, max_tool_turns=args.max_tool_turns))
    examples = _all_test_examples(task, args)
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
    """The first `--limit` records of a data file (default: all), in file order; the built-in tasks draw `--limit`
    examples (default 500)."""
    if task.reads_files:
        return list(task.load("test"))[: args.limit]
    return task.examples("test", args.limit or 500, seed=args.seed)


def _demo(args: Namespace) -> None:
    from opdplus.demo import run_demo

    tasks = args.tasks.split(",") if args.tasks else (["arith"] if args.quick else ["arith", "toolcall"])
    divergences, estimators = args.divergences.split(","), args.estimators.split(",")
    out = Path(args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    if (out / "results.json").exists() and not args.overwrite:
        raise ValueError(f"--out {out} already holds demo results; pick another directory or pass --overwrite")
    overrides = dict(parse_assignment(item) for item in args.set)
    overrides.update({"steps": args.steps} if args.steps else {})
    overrides.update({"lr": args.lr} if args.lr else {})
    per_arm = {"task": "--tasks", "divergence": "--divergences", "estimator": "--estimators", "seed": "--seed",
               "out": "--out", "overwrite": "--overwrite", "tensorboard": None}
    for name in sorted(set(overrides) & set(per_arm)):
        raise ValueError(f"--set {name}=...: the demo sets {name} for each arm" +
                         (f"; use {per_arm[name]}" if per_arm[name] else ""))
    for name in divergences:
        TrainConfig(divergence=name).validate()
    for name in estimators:
        TrainConfig(estimator=name).validate()
    run_demo(out, tasks=tasks, divergences=divergences, estimators=estimators, quick=args.quick, seed=args.seed,
             workers=args.workers, overrides=overrides)


COMMANDS = {"demo": _demo, "train": _train, "eval": _eval, "exact": _exact}


def build_parser(train_defaults: dict | None = None) -> CommandParser:
    """The `opdplus` parser; `train_defaults` (a --config file's settings) replace the train flags' defaults."""
    parser = CommandParser(prog="opdplus", description="On-policy distillation with exact f-divergence advantages.")
    _add_debug(parser)
    commands = parser.add_subcommands(dest="command", required=True)

    demo = CommandParser(description="Every divergence x estimator on the built-in tiny models; table + plot.")
    demo.add_argument("--quick", action="store_true", help="fewer steps, arith only: a smoke run of a few minutes")
    demo.add_argument("--tasks", type=typing.Optional[str], default=None,
                      help="comma-separated (default: arith,toolcall; arith with --quick)")
    demo.add_argument("--divergences", type=str, default="rkl,fkl,jsd", help="comma-separated divergences")
    demo.add_argument("--estimators", type=str, default="opd,opd+,dense",
                      help="comma-separated estimators (opd, opd+, dense, topk:K)")
    demo.add_argument("--steps", type=typing.Optional[int], default=None, help="override the number of steps per arm")
    demo.add_argument("--lr", type=typing.Optional[Float], default=None, help="override the learning rate")
    demo.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="override any training setting for every arm, e.g. --set ppo_epochs=4 (repeatable)")
    demo.add_argument("--seed", type=int, default=0, help="seed of every arm")
    demo.add_argument("--workers", type=int, default=2, help="arms trained at once (one CPU thread each)")
    demo.add_argument("--out", type=typing.Optional[str], default=None,
                      help="output directory (default: runs/demo-<time>)")
    demo.add_argument("--overwrite", action="store_true", help="replace the results of an earlier demo in --out")

    train = CommandParser(usage="%(prog)s [--config FILE] [--SETTING VALUE ...] [--no-progress] [--debug]",
                          description="Distill a teacher into a student. Every setting below is also a key of a "
                                      "--config YAML file (the flag name with _); flags given here override it.")
    train.add_argument("--config", type=typing.Optional[str], default=None,
                       help="YAML file of settings; flags given on the command line override it")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_settings(train, flags_only=True)
    if train_defaults:
        train.set_defaults({key: value for key, value in train_defaults.items() if key not in YAML_ONLY})

    evaluate = CommandParser(description="Accuracy of a model on a task (table + JSONL).")
    evaluate.add_argument("--model", type=str, required=True, help="model directory, tiny: name or hub id")
    evaluate.add_argument("--task", type=str, required=True, help="arith, toolcall, mix, math or tooluse")
    evaluate.add_argument("--data", type=typing.Optional[str], default=None,
                          help="evaluation data for math / tooluse (JSONL, JSON or Parquet)")
    evaluate.add_argument("--question-field", type=str, default="question", help="record field of the question")
    evaluate.add_argument("--answer-field", type=str, default="answer", help="record field of the answer")
    evaluate.add_argument("--max-new-tokens", type=typing.Optional[int], default=None, help="per assistant turn")
    evaluate.add_argument("--tools", type=typing.Optional[str], default=None,
                          help="tools the model may call: a built-in set (arithmetic) or module:attribute")
    evaluate.add_argument("--max-tool-turns", type=int, default=4, help="assistant turns per tool rollout")
    evaluate.add_argument("--k", type=int, default=0, help="also sample k responses per prompt: avg@k, pass@k")
    evaluate.add_argument("--limit", type=typing.Optional[int], default=None,
                          help="evaluate the first N records of --data (built-in tasks: draw N examples; "
                               "default: every record, or 500 draws)")
    evaluate.add_argument("--batch-size", type=int, default=64, help="prompts per generation batch")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the drawn examples and samples")
    evaluate.add_argument("--out", type=typing.Optional[str], default=None,
                          help="per-example JSONL (prompt, output, verdict)")
    evaluate.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")

    exact = CommandParser(description="Compare opd, opd+, dense and topk:K (and the outcome reward mixed in) with "
                                      "the exact gradient on a tabular student.")
    exact.add_argument("--divergences", type=str, default="rkl,fkl,jsd,hellinger,chi2,alpha:0.5",
                       help="comma-separated divergences")
    exact.add_argument("--vocab", type=int, default=3, help="vocabulary size of the tabular student")
    exact.add_argument("--length", type=int, default=3, help="sequence length")
    exact.add_argument("--seed", type=int, default=0, help="seed of the random teacher and student")
    exact.add_argument("--top-k", type=str, default="1", help="comma-separated K of the topk:K columns (< --vocab)")
    exact.add_argument("--reward-weight", type=Float, default=0.5,
                       help="lambda of the outcome-reward columns (0: leave them out)")

    summaries = {"demo": "every divergence x estimator on the built-in tiny models; table + plot",
                 "train": "distill a teacher into a student",
                 "eval": "accuracy of a model on a task (table + JSONL)",
                 "exact": "compare every estimator's expected step with the exact gradient on a tabular student"}
    for name, command in {"demo": demo, "train": train, "eval": evaluate, "exact": exact}.items():
        _add_debug(command)
        commands.add_subcommand(name, command, help=summaries[name])
        command.prog = f"opdplus {name}"
    return parser


def _add_debug(parser: ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show full tracebacks on errors")


def _with_config_file(args: Namespace, argv: list[str]) -> Namespace:
    """Parse `opdplus train` again with the --config file's settings as defaults: flags given override them."""
    settings = load_yaml_config(args.train.config)
    args = build_parser(settings).parse_args(argv)
    for name in YAML_ONLY:
        if name in settings:
            args.train[name] = settings[name]
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    command = args.command
    debug = bool(args.get("debug") or args[command].get("debug"))
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # per-file loading bars drown the run's own progress
    try:
        if command == "train" and args.train.config:
            args = _with_config_file(args, argv)
        COMMANDS[command](args[command])
    except (ValueError, FileNotFoundError, OSError, RuntimeError, ImportError) as error:
        if debug:
            raise
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"opdplus {command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"opdplus {command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
