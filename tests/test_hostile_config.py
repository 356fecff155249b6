"""Hostile run configs from issue 15: bad `teachers:` options, YAML keys that are not names, anchors and aliases
("billion laughs"), out-of-range seeds. Each ends in one line naming the teacher, option, argument or FILE:LINE,
before the run directory exists (and before any model is loaded or any server contacted)."""

import time

import pytest

from opdplus.cli import load_yaml_config, main
from opdplus.config import TrainConfig
from opdplus.teachers import get_teacher

SERVED = "http://127.0.0.1:9"  # nothing listens there: an option check must fail before any request
SMALL = ["--task", "arith", "--prompts-per-step", "2", "--samples-per-prompt", "2", "--max-new-tokens", "8",
         "--eval-every", "0", "--steps", "1", "--no-progress", "--device", "cpu"]


def run_train(tmp_path, capsys, *flags, config_text=None):
    """(exit status, the one stderr line); asserts that the run directory was not created."""
    out = tmp_path / "run"
    argv = ["train", *SMALL, "--out", str(out), *flags]
    if config_text is not None:
        (tmp_path / "run.yaml").write_text(config_text)
        argv[1:1] = ["--config", str(tmp_path / "run.yaml")]
    status = main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert not out.exists()
    return status, lines[-1] if lines else ""


# ---------------------------------------------------------------- teachers: options


@pytest.mark.parametrize("spec,option,valid", [
    ("tiny:arith-teacher", "timeout", "batch_size, device, dtype, system_prompt, temperature"),
    ("tiny:arith-teacher", "retries", "batch_size, device, dtype, system_prompt, temperature"),
    (SERVED, "retries", "api, backoff, batch_size, concurrency, max_retries, model, system_prompt, temperature, timeout, tokenizer"),
])
def test_unknown_teacher_option_is_one_line_before_the_run_directory(tmp_path, capsys, spec, option, valid):
    text = f"teachers:\n  helper:\n    spec: {spec}\n    {option}: 5\n"
    status, line = run_train(tmp_path, capsys, config_text=text)
    assert status == 2
    assert "'helper'" in line and f"'{option}'" in line and valid in line, line


@pytest.mark.parametrize("spec,option,value", [
    ("tiny:arith-teacher", "batch_size", 0),
    ("tiny:arith-teacher", "batch_size", -3),
    ("tiny:arith-teacher", "batch_size", True),
    ("tiny:arith-teacher", "batch_size", 1.5),
    ("tiny:arith-teacher", "batch_size", "8"),
    ("tiny:arith-teacher", "temperature", 0),
    ("tiny:arith-teacher", "temperature", float("inf")),
    ("tiny:arith-teacher", "temperature", float("nan")),
    ("tiny:arith-teacher", "dtype", "float64"),
    ("tiny:arith-teacher", "device", 3),
    (SERVED, "batch_size", 0),
    (SERVED, "concurrency", 0),
    (SERVED, "timeout", 0),
    (SERVED, "timeout", -1.0),
    (SERVED, "timeout", float("inf")),
    (SERVED, "timeout", float("nan")),
    (SERVED, "timeout", "soon"),
    (SERVED, "max_retries", -1),
    (SERVED, "max_retries", 2.5),
    (SERVED, "backoff", -0.5),
    (SERVED, "backoff", float("inf")),
    (SERVED, "model", 5),
    (SERVED, "api", "openai"),
])
def test_bad_teacher_option_value_names_teacher_and_option(spec, option, value):
    config = TrainConfig(teachers={"helper": {"spec": spec, option: value}})
    with pytest.raises(ValueError) as error:
        config.validate()
    message = str(error.value)
    assert "\n" not in message and "'helper'" in message and option in message, message


def test_batch_size_zero_from_yaml_is_one_line(tmp_path, capsys):
    text = "teachers:\n  helper:\n    spec: tiny:arith-teacher\n    batch_size: 0\n"
    status, line = run_train(tmp_path, capsys, config_text=text)
    assert status == 2 and "'helper'" in line and "batch_size" in line, line


def test_good_teacher_options_pass_validation():
    TrainConfig(teachers={"local": {"spec": "tiny:arith-teacher", "batch_size": 8, "temperature": 0.5,
                                    "dtype": "bfloat16", "device": "cpu"},
                          "remote": {"spec": SERVED, "api": "sglang", "timeout": 30, "max_retries": 0,
                                     "backoff": 0, "concurrency": 2, "batch_size": 4, "model": "m"}}).validate()


def test_get_teacher_refuses_unknown_options_by_name():
    with pytest.raises(ValueError, match="unknown option 'retries'"):
        get_teacher(SERVED, retries=3)
    with pytest.raises(ValueError, match="unknown option 'timeout'"):
        get_teacher("tiny:arith-teacher", timeout=3)


# ---------------------------------------------------------------- YAML keys that are not names


@pytest.mark.parametrize("text", [
    "steps: 1\n? !!python/tuple [a, b]\n: 1\n",
    "steps: 1\n? [a, b]\n: 1\n",
    "steps: 1\n? {a: 1}\n: 1\n",
    "steps: 1\n!!binary c3RlcHM=: 1\n",
    "steps: 1\n!!int 5: 1\n",
])
def test_yaml_key_that_is_not_plain_text_is_refused_with_its_line(tmp_path, text):
    path, message = yaml_error(tmp_path, text)
    assert message.startswith(f"{path}:2: ") and "ScalarNode" not in message, message


def yaml_error(tmp_path, text):
    """(the config file, the one-line ValueError that reading it gives)."""
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as error:
        load_yaml_config(path)
    assert "\n" not in str(error.value), error.value
    return path, str(error.value)


@pytest.mark.parametrize("text", [
    "teachers:\n  ? [a, b]\n  : tiny:arith-teacher\n",
    "teachers:\n  ? !!python/tuple [a, b]\n  : tiny:arith-teacher\n",
    "teachers:\n  helper: {spec: tiny:arith-teacher, ? [x] : 1}\n",
])
def test_nested_yaml_key_that_is_not_a_name_is_one_line(tmp_path, text):
    path, message = yaml_error(tmp_path, text)
    assert message.startswith(f"{path}:"), message


# ---------------------------------------------------------------- YAML anchors and aliases


def billion_laughs(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, levels):
        lines.append(f"a{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * 9) + "]")
    return "teachers:\n  " + "\n  ".join(lines) + f"\nsteps: *a{levels - 1}\n"


def test_billion_laughs_is_refused_at_once(tmp_path, capsys):
    start = time.perf_counter()
    status, line = run_train(tmp_path, capsys, config_text=billion_laughs())
    assert time.perf_counter() - start < 1.0
    assert status == 2 and "run.yaml:2:" in line and "anchors and aliases are not supported" in line, line


@pytest.mark.parametrize("text,line", [
    ("steps: &n 3\nsave_every: *n\n", 1),
    ("steps: 3\nteachers: &t {a: tiny:arith-teacher}\n", 2),
    ("base: &b\n  steps: 3\n", 1),
    ("steps: 3\nlr: *nowhere\n", 2),
])
def test_any_anchor_or_alias_is_refused_with_its_line(tmp_path, text, line):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"^{path}:{line}: .*anchors and aliases are not supported"):
        load_yaml_config(path)


# ---------------------------------------------------------------- seed and temperature


@pytest.mark.parametrize("flags,name", [
    (["--seed", "99999999999999999999"], "seed must be an integer in [0, 4294967295]"),
    (["--seed=-1"], "seed"),
    (["--seed", "4294967296"], "seed"),
    (["--temperature", "inf"], "temperature"),
    (["--temperature", "nan"], "temperature"),
])
def test_seed_and_temperature_out_of_range_fail_before_the_run_directory(tmp_path, capsys, flags, name):
    status, line = run_train(tmp_path, capsys, *flags)
    assert status == 2 and line.startswith(f"opdplus train: error: {name}"), line
