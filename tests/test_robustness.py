"""Robustness of the `opdplus` CLI: one table of things users get wrong (and of disks and numbers that fail).

Every error case must end in exit status 2 with ONE line `opdplus <cmd>: error: <message>` as the last line of
stderr (no traceback), name what is wrong (the argument, `file:line`, the path), and leave everything that was
already on disk byte-identical (paths, sizes and sha256 of every file under the data, the models and any existing
run directory). When the error is about the input, a new output directory must not be created (or stay empty).
The few cases that succeed (resume, overwrite, skipped long prompts) check what they must change instead.

Cases run in-process through `opdplus.cli.main([...])`, one through a subprocess (the real entry point), and
a few call Python directly. Rows marked `BUG:` are known defects, kept as strict xfails.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
from vllm_server import free_port

from opdplus.cli import main
from opdplus.rollout import render_prompt
from opdplus.tasks import get_task
from opdplus.tiny import build_char_tokenizer, tiny_config

FIXTURES = Path(__file__).parent / "fixtures"
SMALL = ["--prompts-per-step", "2", "--samples-per-prompt", "2", "--max-new-tokens", "8", "--eval-every", "0",
         "--eval-examples", "2", "--no-tensorboard", "--no-progress"]


# ---- assets: tiny models, broken models, data and config files, a finished run -------------------------------


def _save(model, tokenizer, path: Path) -> str:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _copy_model(source: str, path: Path) -> Path:
    shutil.copytree(source, path)
    return path


class _Pickled:
    """Unpickling this would create `marker`: a stand-in for a malicious `pytorch_model.bin`."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def assets(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("robustness")
    a = SimpleNamespace(root=root, models_root=Path(models["student"]).parent, student=models["student"],
                        teacher=models["teacher"], markers=root / "markers")
    a.markers.mkdir()

    # models & tokenizers
    other = build_char_tokenizer()
    other.add_tokens(["<|extra|>"])  # one token id the student could not have meant
    torch.manual_seed(3)
    a.mismatch = _save(LlamaForCausalLM(tiny_config(len(other), 1, 32, 4)), other, root / "mismatch-teacher")
    broken = LlamaForCausalLM.from_pretrained(models["teacher"])
    with torch.no_grad():
        broken.model.norm.weight[0] = float("nan")  # every teacher log-prob becomes NaN
    a.nan_teacher = _save(broken, build_char_tokenizer(), root / "nan-teacher")
    a.not_model = root / "not-a-model"
    a.not_model.mkdir()
    (a.not_model / "README.txt").write_text("just some files\n")
    a.no_weights = _copy_model(models["student"], root / "no-weights")
    (a.no_weights / "model.safetensors").unlink()
    a.corrupt_config = _copy_model(models["student"], root / "corrupt-config")
    (a.corrupt_config / "config.json").write_text('{"model_type": "llama", ')
    a.no_tokenizer = _copy_model(models["student"], root / "no-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (a.no_tokenizer / name).unlink()

    # security: custom code named by auto_map (model and tokenizer), weights only as a pickle
    a.evil = _copy_model(models["student"], root / "auto-map")
    config = json.loads((a.evil / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig",
                          "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (a.evil / "config.json").write_text(json.dumps(config))
    (a.evil / "modeling_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(a.markers / 'model-code-ran')!r}).touch()\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    pass\n"
        "class EvilForCausalLM(LlamaForCausalLM):\n    pass\n")
    tokenizer_config = json.loads((a.evil / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer",
                                                      "tokenization_evil.EvilTokenizer"]}
    (a.evil / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (a.evil / "tokenization_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(a.markers / 'tokenizer-code-ran')!r}).touch()\n"
        "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    a.pickled = _copy_model(models["student"], root / "pickle-only")
    weights = load_file(str(a.pickled / "model.safetensors"))
    (a.pickled / "model.safetensors").unlink()
    torch.save({**weights, "payload": _Pickled(str(a.markers / "unpickled"))}, a.pickled / "pytorch_model.bin")

    # data (GSM8K format)
    data = root / "data"
    data.mkdir()
    a.good = data / "gsm8k.jsonl"
    shutil.copyfile(FIXTURES / "gsm8k_mini.jsonl", a.good)
    a.missing = data / "missing.jsonl"
    a.empty = data / "empty.jsonl"
    a.empty.write_text("")
    a.malformed = data / "malformed.jsonl"
    a.malformed.write_text('{"question": "1+1?", "answer": "#### 2"}\n{"question": "2+2?", "answer": \n')
    a.no_answer = data / "no-answer.jsonl"
    a.no_answer.write_text('{"question": "1+1?", "answer": "#### 2"}\n\n{"question": "2+2?"}\n')
    a.no_question = data / "no-question.jsonl"
    a.no_question.write_text('{"answer": "#### 2"}\n')

    # run configs (YAML)
    configs = root / "configs"
    configs.mkdir()
    yaml_files = {
        "unknown_key": "steps: 1\nlearning_rate: 0.1\n",
        "wrong_type": "steps: 1\nlr: fast\n",
        "bool_type": "steps: 1\ntensorboard: 1\n",
        "syntax": "steps: 1\nlr: [0.1\n",
        "not_mapping": "- steps\n- lr\n",
        "bad_value": "steps: 1\ngamma: 2\n",
        "python_tag": "steps: !!python/object/apply:os.system ['touch " + str(a.markers / "yaml-ran") + "']\n",
        "duplicate": "steps: 1\nsteps: 2\n",
        "served": f"teachers:\n  remote:\n    spec: http://127.0.0.1:{free_port()}\n    max_retries: 0\n"
                  "    timeout: 5\n",
    }
    for name, text in yaml_files.items():
        path = configs / f"{name}.yaml"
        path.write_text(text)
        setattr(a, f"yaml_{name}", path)
    a.yaml_missing = configs / "missing.yaml"

    # a finished run: checkpoint-1, checkpoint-2, final/, metrics.jsonl, config.json
    a.prior_run = root / "prior-run"
    assert main(["train", "--student", a.student, "--teacher", a.teacher, "--out", str(a.prior_run), "--steps", "2",
                 "--save-every", "1", *SMALL]) == 0

    # rendered prompt lengths of the GSM8K fixture (for --max-prompt-length)
    tokenizer = AutoTokenizer.from_pretrained(a.student)
    a.prompt_lengths = sorted(len(tokenizer(render_prompt(tokenizer, example), add_special_tokens=False)["input_ids"])
                              for example in get_task("math", data=str(a.good)).load("train"))
    return a


def snapshot(path: Path) -> dict:
    """Every file and directory under `path`: relative path -> (size, sha256), or "dir"."""
    path = Path(path)
    if not path.exists():
        return {}
    if path.is_file():
        return {".": (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())}
    found = {}
    for item in sorted(path.rglob("*")):
        key = str(item.relative_to(path))
        found[key] = "dir" if item.is_dir() else (item.stat().st_size, hashlib.sha256(item.read_bytes()).hexdigest())
    return found


# ---- the table --------------------------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    argv: Callable | None = None  # env -> argv for opdplus.cli.main
    expect: tuple | Callable = ()  # substrings of the error line (or env -> substrings)
    code: int | tuple = 2
    prepare: Callable | None = None  # env -> None, before anything is snapshotted
    check: Callable | None = None  # env -> None, extra assertions afterwards
    out_changes: bool = False  # the existing run is meant to change (resume, overwrite)
    creates_out: bool = False  # a successful run creates its output directory
    subprocess: bool = False  # through `python -m opdplus.cli` instead of main()
    call: Callable | None = None  # a Python check instead of a CLI run
    bug: str | None = None
    skip: str | None = None  # a reason to skip the case on this machine


def _items(items, env) -> list[str]:
    return [str(item(env)) if callable(item) else str(item) for item in items]


def train(*extra, steps: int = 1):
    """env -> `opdplus train` argv on the tiny random models, small settings, `--out env.out`; `extra` last."""
    return lambda e: ["train", "--student", e.a.student, "--teacher", e.a.teacher, "--out", str(e.out),
                      "--steps", str(steps), *SMALL, *_items(extra, e)]


def evaluate(*extra, task: str = "math"):
    return lambda e: ["eval", "--model", e.a.student, "--task", task, "--max-new-tokens", "8", "--no-progress",
                      *_items(extra, e)]


def math_data(train_file, test_file):
    return ("--task", "math", "--data", train_file, "--test-data", test_file)


def at(name: str) -> Callable:
    """A path from the assets, resolved when the case runs."""
    return lambda e: getattr(e.a, name)


def copy_prior_run(env) -> None:
    shutil.copytree(env.a.prior_run, env.out)


def metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


# checks ---------------------------------------------------------------------------------------------------------


def check_long_prompts_skipped(env) -> None:
    records = metrics(env.out)
    too_long = sum(length > env.limit for length in env.a.prompt_lengths)
    # every step draws all 5 fixture prompts (--prompts-per-step 5): each too-long one is skipped once a step
    assert [r["long_prompts_skipped_total"] for r in records[1:]] == [too_long, 2 * too_long]
    assert too_long > 0 and (env.out / "final" / "model.safetensors").is_file()


def prepare_long_prompt_limit(env) -> None:
    lengths = env.a.prompt_lengths
    assert lengths[-1] > lengths[0], "the fixture's prompts must differ in length"
    env.limit = max(length for length in lengths if length < lengths[-1])  # only the longest prompt(s) exceed


def check_resumed(env) -> None:
    before, after = env.before[str(env.out)], snapshot(env.out)
    records = metrics(env.out)
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    old = (env.a.prior_run / "metrics.jsonl").read_text().splitlines()
    assert (env.out / "metrics.jsonl").read_text().splitlines()[:3] == old  # steps 0-2 kept as they were
    assert sorted(p.name for p in env.out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]  # keep_last 2
    kept = {k: v for k, v in before.items() if k.startswith("checkpoint-2/")}
    assert kept and all(after[k] == v for k, v in kept.items())  # continued from it, not rewritten
    assert after["final/model.safetensors"] != before["final/model.safetensors"]


def prepare_overwrite(env) -> None:
    copy_prior_run(env)
    (env.out / "notes.txt").write_text("the user's own file: not a run file, must survive --overwrite\n")


def check_overwritten(env) -> None:
    assert [r["step"] for r in metrics(env.out)] == [0, 1]
    assert not list(env.out.glob("checkpoint-*"))  # the old run's checkpoints are gone
    assert (env.out / "final" / "model.safetensors").is_file()
    assert snapshot(env.out)["notes.txt"] == env.before[str(env.out)]["notes.txt"]  # not a run file: kept


def prepare_unwritable(env) -> None:
    locked = env.tmp / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    env.cleanups.append(lambda: locked.chmod(0o700))
    if os.access(locked, os.W_OK):  # root ignores modes: use a path that cannot be created instead
        blocker = env.tmp / "somefile"
        blocker.write_text("a regular file where a directory would have to be\n")
        env.guard.append(blocker)
        env.out = blocker / "run"
    else:
        env.out = locked / "run"


def prepare_out_is_file(env) -> None:
    env.out = env.tmp / "run.txt"
    env.out.write_text("not a directory\n")
    env.guard.append(env.out)


def prepare_eval_out(env) -> None:
    env.eval_out = env.tmp / "results.jsonl"
    env.eval_out.write_text('{"previous": "results"}\n')
    env.guard.append(env.eval_out)


def prepare_eval_out_under_file(env) -> None:
    env.blocker = env.tmp / "afile"
    env.blocker.write_text("a regular file\n")
    env.guard.append(env.blocker)


def prepare_disk_full(env) -> None:
    """torch.save inside the checkpoint writer raises ENOSPC while checkpoint-2 is written."""
    real = torch.save
    env.real_save = real

    def save(obj, f, *args, **kwargs):
        if ".checkpoint-2.tmp-" in str(f):
            env.first_checkpoint = snapshot(env.out / "checkpoint-1")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *args, **kwargs)

    env.monkeypatch.setattr(torch, "save", save)


def check_disk_full(env) -> None:
    names = sorted(p.name for p in env.out.iterdir())
    assert names == ["checkpoint-1", "config.json", "metrics.jsonl"], names  # no checkpoint-2, no final, no .tmp
    assert env.first_checkpoint and snapshot(env.out / "checkpoint-1") == env.first_checkpoint
    checkpoint = env.out / "checkpoint-1"
    AutoModelForCausalLM.from_pretrained(checkpoint, use_safetensors=True)
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
        torch.load(checkpoint / name, weights_only=True)
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == 1
    # space freed: --resume continues from checkpoint-1
    env.monkeypatch.setattr(torch, "save", env.real_save)
    assert main([*env.argv, "--resume"]) == 0
    assert [r["step"] for r in metrics(env.out)] == [0, 1, 2, 3]
    assert sorted(p.name for p in env.out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]


def check_non_finite(env) -> None:
    records = metrics(env.out)
    assert [r["skipped_update"] for r in records[1:]] == [1, 1]
    assert sorted(p.name for p in env.out.iterdir()) == ["checkpoint-1", "config.json", "metrics.jsonl"]
    start = load_file(str(Path(env.a.student) / "model.safetensors"))
    saved = load_file(str(env.out / "checkpoint-1" / "model.safetensors"))  # written after the skipped step 1
    assert start.keys() == saved.keys() and all(torch.equal(start[name], saved[name]) for name in start)


def check_no_code_ran(env) -> None:
    assert not list(env.a.markers.iterdir()), f"checkpoint code ran: {list(env.a.markers.iterdir())}"


def call_tool_parser(env) -> None:
    from opdplus.tasks.tooluse import check_calls
    from opdplus.tools import parse_calls

    marker = env.tmp / "MARKER"  # the cwd is env.tmp, so `touch MARKER` would land here
    payloads = [
        "__import__('os').system('touch MARKER')",
        f"__import__('os').system('touch {marker}')",
        "[f(a=__import__('os').system('touch MARKER'))]",
        "exec(\"open('MARKER', 'w')\")",
        "[eval(\"__import__('os').system('touch MARKER')\")]",
        '<tool_call>{"name": "f", "arguments": {"a": "__import__(\'os\').system(\'touch MARKER\')"}}</tool_call>',
        "```python\nimport os; os.system('touch MARKER')\n```",
        "[f(a=(lambda: __import__('os').system('touch MARKER'))())]",
    ]
    functions = [{"name": "f", "parameters": {"type": "dict", "properties": {"a": {"type": "integer"}},
                                              "required": ["a"]}}]
    for payload in payloads:
        calls = parse_calls(payload)
        assert calls is None or all(isinstance(c["arguments"], dict) for c in calls)
        assert check_calls(payload, functions, [{"f": {"a": [1]}}]) in (True, False)
    assert not marker.exists()


def call_debug_traceback(env) -> None:
    with pytest.raises(ValueError, match="lr must be positive"):
        main(["train", "--debug", "--lr", "0", "--out", str(env.out), "--no-progress"])
    assert not env.out.exists()


CASES = [
    # -- models & tokenizers
    Case("model/missing-path", train("--student", lambda e: e.tmp / "no-such-model"),
         expect=lambda e: [f"model not found: {e.tmp / 'no-such-model'} is not a directory"]),
    Case("model/missing-path-relative", train("--student", "./no-such-model"),
         expect=("model not found: ./no-such-model is not a directory",)),
    Case("model/missing-path-eval", evaluate("--data", at("good"), "--model", lambda e: e.tmp / "no-such-model"),
         expect=("model not found:", "no-such-model")),
    Case("model/not-a-model-dir", train("--student", at("not_model")),
         expect=lambda e: [f"model not found: {e.a.not_model} has no config.json"]),
    Case("model/teacher-not-a-model-dir", train("--teacher", at("not_model")),
         expect=lambda e: [f"{e.a.not_model} has no config.json"]),
    Case("model/not-a-model-dir-eval", evaluate("--model", at("not_model"), task="arith"),
         expect=("has no config.json",)),
    Case("model/unknown-tiny-name", train("--student", "tiny:no-such"),
         expect=("unknown tiny model 'tiny:no-such'", "available: tiny:")),
    Case("model/unknown-tiny-name-eval", evaluate("--model", "tiny:no-such", task="arith"),
         expect=("unknown tiny model 'tiny:no-such'",)),
    Case("model/config-without-weights", evaluate("--model", at("no_weights"), task="arith"),
         expect=("cannot load model", "no file named model.safetensors")),
    Case("model/corrupt-config-json", evaluate("--model", at("corrupt_config"), task="arith"),
         expect=("cannot load model", "not a valid JSON file")),
    Case("model/missing-tokenizer-files", evaluate("--model", at("no_tokenizer"), task="arith"),
         expect=lambda e: [str(e.a.no_tokenizer)]),
    # a teacher with another vocabulary (one extra token) is no longer refused: it re-tokenizes (issue 17)
    Case("model/tokenizer-mismatch-trains-by-spans", train("--teacher", at("mismatch")), code=0, creates_out=True),

    # -- data (math task, GSM8K format)
    Case("data/train-file-missing", train(*math_data(at("missing"), at("good"))),
         expect=lambda e: [f"data file not found: {e.a.missing}"]),
    Case("data/train-file-empty", train(*math_data(at("empty"), at("good"))),
         expect=lambda e: [f"data file is empty: {e.a.empty}"]),
    Case("data/train-malformed-line", train(*math_data(at("malformed"), at("good"))),
         expect=lambda e: [f"{e.a.malformed}:2: invalid JSON"]),
    Case("data/train-missing-answer-field", train(*math_data(at("no_answer"), at("good"))),
         expect=lambda e: [f"{e.a.no_answer}:3: missing field 'answer'"]),
    Case("data/test-missing-question-field", train(*math_data(at("good"), at("no_question"))),
         expect=lambda e: [f"{e.a.no_question}:1: missing field 'question'"]),
    Case("data/test-file-malformed", train(*math_data(at("good"), at("malformed"))),
         expect=lambda e: [f"{e.a.malformed}:2: invalid JSON"]),
    Case("data/question-field-renamed", train(*math_data(at("good"), at("good")), "--question-field", "problem"),
         expect=lambda e: [f"{e.a.good}:1: missing field 'problem'"]),
    Case("data/math-without-data", train("--task", "math"), expect=("task 'math' reads data files", "--data")),
    Case("data/unknown-task", train("--task", "poetry"), expect=("unknown task 'poetry'", "valid tasks:")),
    Case("data/eval-file-missing", evaluate("--data", at("missing")),
         expect=lambda e: [f"data file not found: {e.a.missing}"]),
    Case("data/eval-file-empty", evaluate("--data", at("empty")),
         expect=lambda e: [f"data file is empty: {e.a.empty}"]),
    Case("data/eval-malformed-line", evaluate("--data", at("malformed")),
         expect=lambda e: [f"{e.a.malformed}:2: invalid JSON"]),
    Case("data/eval-missing-answer-field", evaluate("--data", at("no_answer")),
         expect=lambda e: [f"{e.a.no_answer}:3: missing field 'answer'"]),
    Case("data/eval-missing-question-field", evaluate("--data", at("no_question"), "--limit", "1"),
         expect=lambda e: [f"{e.a.no_question}:1: missing field 'question'"]),

    # -- prompt length
    Case("prompts/too-long-fail", train(*math_data(at("good"), at("good")), "--max-prompt-length", "5",
                                        "--long-prompts", "fail"),
         expect=("tokens exceeds max_prompt_length=5", "--long-prompts skip")),
    Case("prompts/too-long-skip-counts", train(*math_data(at("good"), at("good")), "--prompts-per-step", "5",
                                               "--max-prompt-length", lambda e: e.limit, steps=2),
         code=0, prepare=prepare_long_prompt_limit, check=check_long_prompts_skipped, creates_out=True),
    Case("prompts/all-too-long-skip", train(*math_data(at("good"), at("good")), "--max-prompt-length", "5"),
         expect=("every prompt of the batch exceeds max_prompt_length=5",)),

    # -- config values
    Case("config/tools-unknown-set", train("--tools", "calculator"), expect=("tools: 'calculator' is neither a built-in set",)),
    Case("config/tools-missing-attribute", train("--tools", "opdplus.tools:nothing"),
         expect=("tools: cannot load 'opdplus.tools:nothing'",)),
    Case("config/tools-with-vllm-backend", train("--tools", "arithmetic", "--rollout-backend", "vllm"),
         expect=("multi-turn tool rollouts run on the hf rollout backend only",)),
    Case("config/max-tool-turns-zero", train("--tools", "arithmetic", "--max-tool-turns", "0"),
         expect=("max_tool_turns must be a positive integer, got 0",)),
    Case("config/tools-template-without-tool-role", evaluate("--tools", "arithmetic", "--limit", "2", task="arith"),
         expect=("chat template cannot render this conversation (roles system,user, with tools)",)),
    Case("config/lr-zero", train("--lr", "0"), expect=("lr must be positive, got 0.0",)),
    Case("config/lr-negative", train("--lr=-1e-3"), expect=("lr must be positive",)),
    Case("config/lr-nan", train("--lr", "nan"), expect=("lr must be positive, got nan",)),
    Case("config/prompts-per-step-zero", train("--prompts-per-step", "0"),
         expect=("prompts_per_step must be a positive integer, got 0",)),
    Case("config/samples-per-prompt-negative", train("--samples-per-prompt", "-2"),
         expect=("samples_per_prompt must be a positive integer, got -2",)),
    Case("config/gamma-above-one", train("--gamma", "1.5"), expect=("gamma must be in [0, 1], got 1.5",)),
    Case("config/gamma-negative", train("--gamma", "-0.1"), expect=("gamma must be in [0, 1], got -0.1",)),
    Case("config/unknown-divergence", train("--divergence", "kl"), expect=("unknown divergence 'kl'", "valid:")),
    Case("config/unknown-estimator", train("--estimator", "ppo"), expect=("estimator must be one of", "'ppo'")),
    Case("config/top-k-negative", train("--top-k", "-1"), expect=("top_k must be >= 0",)),
    Case("config/top-p-above-one", train("--top-p", "1.5"), expect=("top_p must be in (0, 1], got 1.5",)),
    Case("config/top-p-zero", train("--top-p", "0"), expect=("top_p must be in (0, 1]",)),
    Case("config/unknown-lr-schedule", train("--lr-schedule", "step"), expect=("lr_schedule must be one of",)),
    Case("config/unknown-long-prompts", train("--long-prompts", "maybe"), expect=("long_prompts must be skip or fail",)),
    Case("config/resume-and-overwrite", train("--resume", "--overwrite"),
         expect=("resume and overwrite exclude each other",)),
    Case("config/unknown-dtype", train("--dtype", "float8"),
         expect=("dtype must be float32, bfloat16 or float16, got 'float8'",)),
    Case("config/unknown-device", train("--device", "tpu"), expect=("device 'tpu' is not available",)),
    Case("config/cuda-device-without-cuda", train("--device", "cuda"), expect=("cuda",),
         skip="CUDA is available here" if torch.cuda.is_available() else None),
    Case("config/unknown-rollout-backend", train("--rollout-backend", "sglang"),
         expect=("rollout_backend must be hf or vllm, got 'sglang'",)),
    Case("config/rollout-backend-vllm-not-installed", train("--rollout-backend", "vllm"), expect=("opdplus[vllm]",),
         skip="vLLM is installed here" if importlib.util.find_spec("vllm") else None),
    Case("config/not-an-int", train("--steps", "many"), expect=("argument --steps: invalid int value: 'many'",)),

    # -- YAML run configs
    Case("yaml/unknown-key", train("--config", at("yaml_unknown_key")),
         expect=lambda e: [f"{e.a.yaml_unknown_key}:2: unknown key 'learning_rate'", "valid keys:"]),
    Case("yaml/wrong-type", train("--config", at("yaml_wrong_type")),
         expect=lambda e: [f"{e.a.yaml_wrong_type}:2: lr must be float, got 'fast'"]),
    Case("yaml/int-for-bool", train("--config", at("yaml_bool_type")),
         expect=lambda e: [f"{e.a.yaml_bool_type}:2: tensorboard must be bool"]),
    Case("yaml/invalid-syntax", train("--config", at("yaml_syntax")),
         expect=lambda e: [f"{e.a.yaml_syntax}:3: invalid YAML"]),
    Case("yaml/not-a-mapping", train("--config", at("yaml_not_mapping")),
         expect=lambda e: [f"{e.a.yaml_not_mapping}:1: expected a mapping of settings"]),
    Case("yaml/missing-file", train("--config", at("yaml_missing")),
         expect=lambda e: [f"config file not found: {e.a.yaml_missing}"]),
    Case("yaml/invalid-value", train("--config", at("yaml_bad_value")), expect=("gamma must be in [0, 1], got 2.0",)),
    Case("yaml/python-tag", train("--config", at("yaml_python_tag")),
         expect=lambda e: [f"{e.a.yaml_python_tag}:1"], check=check_no_code_ran),
    Case("yaml/duplicate-key", train("--config", at("yaml_duplicate")),
         expect=lambda e: [f"{e.a.yaml_duplicate}:2", "steps"]),

    # -- run directory & checkpoints
    Case("run/holds-another-run", train(), prepare=copy_prior_run,
         expect=lambda e: [f"output directory {e.out} holds another run", "--resume", "--overwrite"]),
    Case("run/resume-continues", train("--resume", "--save-every", "1", steps=3), prepare=copy_prior_run,
         code=0, out_changes=True, check=check_resumed),
    Case("run/overwrite-replaces", train("--overwrite"), prepare=prepare_overwrite, code=0, out_changes=True,
         check=check_overwritten),
    Case("run/unwritable-parent", train(), prepare=prepare_unwritable, expect=("is not writable",)),
    Case("run/out-is-a-file", train(), prepare=prepare_out_is_file,
         expect=lambda e: [f"output directory {e.out} is not writable"]),
    Case("run/eval-out-exists", evaluate("--out", lambda e: e.eval_out, "--limit", "1", task="arith"),
         prepare=prepare_eval_out, expect=("exists; pick another file or pass --overwrite",)),
    Case("run/eval-out-under-a-file", evaluate("--out", lambda e: e.blocker / "results.jsonl", "--limit", "1",
                                               task="arith"),
         prepare=prepare_eval_out_under_file, expect=lambda e: [str(e.blocker)]),
    Case("run/disk-full-at-second-checkpoint", train("--save-every", "1", steps=3), prepare=prepare_disk_full,
         expect=lambda e: [f"no space left on device writing {e.out / 'checkpoint-2'}"], creates_out=True,
         check=check_disk_full),

    # -- numerics
    Case("numerics/nan-teacher-stops", train("--teacher", at("nan_teacher"), "--save-every", "1",
                                             "--max-bad-steps", "2", steps=4),
         expect=lambda e: ["2 consecutive steps with non-finite values (last at step 2)",
                           f"the last good checkpoint in {e.out} is intact"],
         creates_out=True, check=check_non_finite),

    # -- served teachers
    Case("served/teacher-unreachable", train("--config", at("yaml_served")),
         expect=("teacher at http://127.0.0.1:", "/v1/models unavailable after 1 attempts", "Connection refused")),

    # -- security: loading a checkpoint never runs its code
    Case("security/auto-map-custom-code", evaluate("--model", at("evil"), "--limit", "1", task="arith"),
         code=(0, 2), check=check_no_code_ran),
    Case("security/auto-map-custom-code-train", train("--student", at("evil"), "--teacher", at("evil")),
         code=(0, 2), creates_out=True, check=check_no_code_ran),
    Case("security/pickle-only-weights-eval", evaluate("--model", at("pickled"), "--limit", "1", task="arith"),
         expect=("cannot load model", "no file named model.safetensors"), check=check_no_code_ran),
    Case("security/pickle-only-weights-teacher", train("--teacher", at("pickled")),
         expect=("no file named model.safetensors",), check=check_no_code_ran),
    Case("security/tool-call-parser", call=call_tool_parser),

    # -- the CLI itself
    Case("cli/debug-shows-traceback", call=call_debug_traceback),
    Case("cli/entry-point-subprocess", train("--gamma", "2"), subprocess=True, expect=("gamma must be in [0, 1]",)),
]


def _param(case: Case):
    marks = [pytest.mark.xfail(strict=True, reason=f"BUG: {case.bug}")] if case.bug else []
    marks += [pytest.mark.skip(reason=case.skip)] if case.skip else []
    return pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", [_param(case) for case in CASES])
def test_cli_robustness(case: Case, assets, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # relative defaults (runs/...) land in tmp
    env = SimpleNamespace(a=assets, tmp=tmp_path, out=tmp_path / "run", monkeypatch=monkeypatch, guard=[],
                          cleanups=[])
    try:
        _run_case(case, env, capsys)
    finally:
        for cleanup in env.cleanups:
            cleanup()


def _run_case(case: Case, env, capsys) -> None:
    if case.prepare:
        case.prepare(env)
    if case.call:
        case.call(env)
        return
    out_existed = env.out.exists()
    guarded = [env.a.root, env.a.models_root, *env.guard] + ([env.out] if out_existed else [])
    env.before = {str(path): snapshot(path) for path in guarded}
    env.argv = argv = case.argv(env)
    capsys.readouterr()

    if case.subprocess:
        result = subprocess.run([sys.executable, "-m", "opdplus.cli", *argv], capture_output=True, text=True,
                                timeout=120)
        code, err = result.returncode, result.stderr
    else:
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse
            code = exit_.code
        except Exception as error:  # noqa: BLE001 - an escaping exception is what this suite looks for
            pytest.fail(f"main() raised {type(error).__name__} instead of a one-line error: {str(error)[:300]}")
        err = capsys.readouterr().err

    codes = case.code if isinstance(case.code, tuple) else (case.code,)
    assert code in codes, f"exit status {code}, expected {codes}; stderr: {err[-500:]}"
    assert "Traceback" not in err, err[-2000:]
    if code == 2:
        command = argv[0]
        lines = err.strip().splitlines()
        assert lines, "no error message"
        last = lines[-1]
        assert last.startswith(f"opdplus {command}: error: "), f"last stderr line: {last!r}"
        assert sum(": error:" in line for line in lines) == 1, err[-2000:]
        expected = case.expect(env) if callable(case.expect) else case.expect
        for text in expected:
            assert str(text) in last, f"{text!r} not in {last!r}"

    for path in guarded:
        if case.out_changes and path == env.out:
            continue
        assert snapshot(path) == env.before[str(path)], f"{path} changed"
    if not out_existed and not case.creates_out:
        assert not env.out.exists() or not any(env.out.iterdir()), \
            f"an error about the input left {sorted(p.name for p in env.out.iterdir())} in {env.out}"
    for root in (env.a.root, env.out):
        assert not list(Path(root).rglob(".*.tmp-*")) if Path(root).is_dir() else True, "temporary files left"
    if case.check:
        case.check(env)


# ---- settings: flags over the --config file, and --help ----------------------------------------------------------


def test_flags_override_the_config_file(tmp_path, monkeypatch):
    """A --config file's settings replace the defaults; flags on the command line win wherever they stand."""
    seen = []
    monkeypatch.setattr("opdplus.trainer.train", lambda config, progress: seen.append(config) or {"step": 0})
    path = tmp_path / "run.yaml"
    path.write_text("steps: 7\nlr: 0.5\nmax_grad_norm: 2\ntensorboard: false\nteachers:\n  other: tiny:arith-teacher\n")
    assert main(["train", "--steps", "3", "--config", str(path), "--max-grad-norm", "off", "--lr", "nan",
                 "--out", str(tmp_path / "run")]) == 0
    config = seen[0]
    assert (config.steps, config.max_grad_norm, config.tensorboard) == (3, None, False)
    assert config.lr != config.lr  # nan reaches TrainConfig.validate(), which refuses it by name
    assert config.teachers == {"other": "tiny:arith-teacher"}


def test_train_help_says_what_each_setting_does_by_group(capsys):
    import dataclasses

    from opdplus.config import TrainConfig

    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    text, packed = " ".join(out.split()), "".join(out.split())  # help wraps lines, also at hyphens
    fields = dataclasses.fields(TrainConfig)
    titles = list(dict.fromkeys(field.metadata["group"] for field in fields))
    assert [line[:-1] for line in out.splitlines() if line[:-1] in titles] == titles  # group headings, in order
    for field in fields:
        sentence = field.metadata["help"]
        assert sentence.endswith("."), (field.name, sentence)
        if field.name != "teachers":  # several teachers: a mapping, YAML only
            flag = f"--{field.name.replace('_', '-')}"
            assert f"{flag} " in text or f"{flag}, --no-" in text
            assert "".join(sentence.split()) in packed, sentence
