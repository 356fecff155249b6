"""Hostile data files from issue 15: math and tool-use records of the wrong type or shape, and strings that are not
text (a lone surrogate escape). Each ends in one line naming FILE:LINE and the field, before anything is written."""

import json

import pytest

from opdplus.cli import main
from opdplus.tasks import get_task

SMALL = ["--prompts-per-step", "2", "--samples-per-prompt", "2", "--max-new-tokens", "8", "--eval-every", "0",
         "--eval-examples", "2", "--no-tensorboard", "--no-progress"]
GOOD_MATH = {"question": "What is 2 + 3?", "answer": "#### 5"}


def one_line(message: str) -> str:
    assert "\n" not in message, message
    return message


def write_jsonl(path, records) -> str:
    path.write_text("".join((record if isinstance(record, str) else json.dumps(record)) + "\n" for record in records))
    return str(path)


def load_error(task: str, data: str, **options) -> str:
    with pytest.raises(ValueError) as error:
        get_task(task, data=data, **options).load("train")
    return one_line(str(error.value))


# ---------------------------------------------------------------- 1. math fields: a non-empty string or a number


@pytest.mark.parametrize("field", ["question", "answer"])
@pytest.mark.parametrize("value", [None, [], ["5"], {"a": 5}, "", "   ", True])
def test_math_field_must_be_a_non_empty_string_or_number(tmp_path, field, value):
    data = write_jsonl(tmp_path / "math.jsonl", [GOOD_MATH, {**GOOD_MATH, field: value}])
    message = load_error("math", data)
    assert message == f"{data}:2: field {field!r} must be a non-empty string or number", message


def test_math_fields_named_by_the_configured_names(tmp_path):
    data = write_jsonl(tmp_path / "math.jsonl", [{"problem": "1 + 1?", "solution": None}])
    message = load_error("math", data, question_field="problem", answer_field="solution")
    assert message == f"{data}:1: field 'solution' must be a non-empty string or number", message


def test_math_numbers_are_fine_answers(tmp_path):
    data = write_jsonl(tmp_path / "math.jsonl", [{"question": "2 + 3?", "answer": 5},
                                                  {"question": 7, "answer": 2.5}])
    examples = get_task("math", data=data).load("train")
    assert [example.reference for example in examples] == ["5", "2.5"]


# ---------------------------------------------------------------- 2. a lone surrogate is not text


def test_a_lone_surrogate_is_refused_naming_file_line_and_field(tmp_path):
    data = write_jsonl(tmp_path / "math.jsonl", [GOOD_MATH, '{"question": "x \\ud800 y", "answer": "#### 1"}'])
    message = load_error("math", data)
    assert message.startswith(f"{data}:2: field 'question'") and "surrogate" in message, message


def test_a_lone_surrogate_nested_in_a_tool_use_record_is_refused(tmp_path):
    record = {"id": "a", "question": [[{"role": "user", "content": "hi \udc00"}]], "function": [],
              "ground_truth": []}
    data = tmp_path / "bfcl.json"
    data.write_text(json.dumps(record) + "\n")  # json.dumps writes the lone surrogate as \udc00
    message = load_error("tooluse", str(data))
    assert message.startswith(f"{data}:1: field 'question'") and "surrogate" in message, message


@pytest.mark.parametrize("which", ["--data", "--test-data"])
def test_bad_data_fails_before_the_run_directory_exists(models, tmp_path, capsys, which):
    good = write_jsonl(tmp_path / "good.jsonl", [GOOD_MATH] * 3)
    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD_MATH, '{"question": "\\ud800", "answer": "#### 1"}'])
    files = {"--data": good, "--test-data": good, which: bad}
    out = tmp_path / "run"
    capsys.readouterr()
    code = main(["train", "--student", models["student"], "--teacher", models["teacher"], "--out", str(out),
                 "--steps", "1", *SMALL, "--task", "math", "--data", files["--data"],
                 "--test-data", files["--test-data"]])
    error = one_line(capsys.readouterr().err.strip())
    assert code == 2 and f"{bad}:2: field 'question'" in error, error
    assert not out.exists()


# ---------------------------------------------------------------- 3. tool-use records of the wrong shape

GOOD_TOOL = {"id": "t0", "question": [[{"role": "user", "content": "Area of a 2 by 3 rectangle?"}]],
             "function": [{"name": "area", "description": "Area.", "parameters": {
                 "type": "dict", "properties": {"w": {"type": "integer"}, "h": {"type": "integer"}},
                 "required": ["w", "h"]}}],
             "ground_truth": [{"area": {"w": [2], "h": [3]}}]}


@pytest.mark.parametrize("field,value,expected", [
    ("question", [], "field 'question' must be"),
    ("question", [["hello"]], "field 'question' must be"),
    ("question", [[]], "field 'question' must be"),
    ("question", [[{"role": "user"}]], "field 'question' must be"),
    ("question", [[{"role": "user", "content": 5}]], "field 'question' must be"),
    ("question", None, "field 'question' must be"),
    ("question", {"role": "user"}, "field 'question' must be"),
    ("function", "area", "field 'function' must be"),
    ("function", ["area"], "field 'function' must be"),
    ("function", [{"description": "no name"}], "field 'function' must be"),
    ("function", [{"name": "area", "parameters": []}], "field 'function' must be"),
    ("function", [{"name": "area", "parameters": {"properties": ["w"]}}], "field 'function' must be"),
    ("ground_truth", "area(w=2, h=3)", "field 'ground_truth' must be"),
    ("ground_truth", ["area"], "field 'ground_truth' must be"),
    ("ground_truth", [{}], "field 'ground_truth' must be"),
    ("ground_truth", [{"area": [2, 3]}], "field 'ground_truth' must be"),
    ("id", ["t0"], "field 'id' must be"),
])
def test_tool_use_record_of_the_wrong_shape_is_one_line(tmp_path, field, value, expected):
    data = write_jsonl(tmp_path / "bfcl.json", [GOOD_TOOL, {**GOOD_TOOL, "id": "t1", field: value}])
    message = load_error("tooluse", data)
    assert message.startswith(f"{data}:2: {expected}"), message


@pytest.mark.parametrize("missing", ["id", "question", "function"])
def test_tool_use_record_missing_a_key_is_one_line(tmp_path, missing):
    record = {key: value for key, value in GOOD_TOOL.items() if key != missing}
    data = write_jsonl(tmp_path / "bfcl.json", [GOOD_TOOL, record])
    assert load_error("tooluse", data) == f"{data}:2: missing field {missing!r}"


def test_tool_use_answers_file_of_the_wrong_shape_is_one_line(tmp_path):
    question = {key: value for key, value in GOOD_TOOL.items() if key != "ground_truth"}
    data = write_jsonl(tmp_path / "bfcl.json", [question])
    answers = write_jsonl(tmp_path / "bfcl.answers.json", [{"id": "t0", "ground_truth": {"area": {"w": [2]}}}])
    assert load_error("tooluse", data).startswith(f"{answers}:1: field 'ground_truth' must be")


def test_a_good_tool_use_record_still_loads(tmp_path):
    data = write_jsonl(tmp_path / "bfcl.json", [GOOD_TOOL, {**GOOD_TOOL, "id": "t1", "question": "A bare string?"}])
    assert [example.prompt for example in get_task("tooluse", data=data).load("train")] == [
        "Area of a 2 by 3 rectangle?", "A bare string?"]


# ---------------------------------------------------------------- 4. prompts longer than the model's context


def test_a_prompt_longer_than_the_context_fails_before_the_run_directory(models, tmp_path, capsys):
    """The tiny student's context is 128 tokens: a 461-character question (one token a character) cannot fit."""
    long_question = {"question": "What is " + " + ".join(["1"] * 100) + "?", "answer": "#### 100"}
    data = write_jsonl(tmp_path / "math.jsonl", [GOOD_MATH, long_question, GOOD_MATH])
    out = tmp_path / "run"
    argv = ["train", "--student", models["student"], "--teacher", models["teacher"], "--out", str(out), "--steps",
            "1", *SMALL, "--task", "math", "--data", data, "--test-data", write_jsonl(tmp_path / "t.jsonl", [GOOD_MATH])]
    capsys.readouterr()
    code = main(argv)
    error = one_line(capsys.readouterr().err.strip())
    assert code == 2 and f"{data}: example 2" in error and "128" in error and "--max-prompt-length" in error, error
    assert not out.exists()
    assert main([*argv, "--max-prompt-length", "100"]) == 0  # the fix the message names: the long prompt is dropped
