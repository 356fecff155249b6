"""Tools and checkers under hostile input: capped tool messages, verifiers that never raise, math grading that
reads the answer after `####`, accepts answers split over boxes and never hangs in a worker thread."""

import json
import threading
from pathlib import Path

import pytest

from opdplus.cli import main
from opdplus.tasks import ArithTask, MathTask, MixTask, ToolCallTask, ToolUseTask
from opdplus.tasks.base import Example
from opdplus.tasks.math import is_correct
from opdplus.tasks.withtools import WithTools
from opdplus.tools import MAX_RESULT_CHARS, load_tools

FIXTURES = Path(__file__).parent / "fixtures"
HOSTILE = [
    "[" * 5000, "{" * 5000, "(" * 5000, "9" * 5000, "#" + "9" * 5000, "#-" + "9" * 5000, "\\boxed{" * 3000,
    "#### " + "9" * 5000, '{"name": "weather", "arguments": ' * 2000, "[f(a=" * 2000, "\x00\ud800", "#" * 50_000,
    '{"name": "weather", "arguments": {"city": ' + "[" * 3000 + "]" * 3000 + "}}", "1e999", "NaN", "",
]


# ---- tool messages ----------------------------------------------------------------------------------------


def test_every_tool_message_is_capped_error_messages_included():
    toolbox = load_tools("arithmetic")
    assert len(toolbox.call("x" * 99_000, {})) <= MAX_RESULT_CHARS
    assert len(toolbox.call(["x"] * 99_000, {})) <= MAX_RESULT_CHARS
    assert len(toolbox.call("add", {"a": 1, "b": 2, "c" * 99_000: 3})) <= MAX_RESULT_CHARS
    assert toolbox.call("add", {"a": 1, "b": 2}) == "3"


# ---- verifiers never raise --------------------------------------------------------------------------------


def _tasks_with_examples():
    tooluse = ToolUseTask(test_path=str(FIXTURES / "bfcl_mini.json"))
    math = MathTask(test_path=str(FIXTURES / "gsm8k_mini.jsonl"))
    yield ArithTask(), ArithTask().examples("test", 1)[0]
    yield ToolCallTask(), ToolCallTask().examples("test", 1)[0]
    yield MixTask({"arith": ArithTask(), "toolcall": ToolCallTask()}), None
    yield math, math.load("test")[0]
    yield tooluse, tooluse.load("test")[0]
    yield WithTools(ArithTask(), load_tools("arithmetic")), ArithTask().examples("test", 1)[0]


@pytest.mark.parametrize("text", HOSTILE, ids=range(len(HOSTILE)))
def test_every_verifier_returns_false_on_hostile_text(text):
    for task, example in _tasks_with_examples():
        for one in [example] if example is not None else task.examples("test", 2):
            assert task.verify(text, one) is False, task.name


def test_arith_verify_on_a_huge_integer_and_toolcall_on_deep_nesting():
    example = Example(prompt="1+1=", reference=2, response="1+1=2#2")
    assert ArithTask().verify("#" + "9" * 5000, example) is False
    assert ToolCallTask().verify("[" * 5000, ToolCallTask().examples("test", 1)[0]) is False


# ---- math grading -----------------------------------------------------------------------------------------


def test_the_answer_after_hashes_is_graded_not_the_last_number():
    assert is_correct("#### 18\nThat is 23 minus 5.", "#### 18")
    assert not is_correct("#### 18\nThat is 23 minus 5.", "#### 5")
    assert is_correct("First 3 + 4 = 7.\n#### 7", "#### 7")
    assert is_correct("#### The answer is 42.", "42")


def test_answers_split_over_several_boxes_are_judged_as_math_verify_would():
    assert is_correct(r"So $x = \boxed{2}$ and $x = \boxed{3}$.", r"\boxed{2, 3}")
    assert not is_correct(r"\boxed{2} and \boxed{3}", r"\boxed{2}")  # a set is not one of its members
    assert is_correct(r"First \boxed{5}, finally \boxed{18}", "18")  # the last box still wins
    assert not is_correct(r"First \boxed{5}, finally \boxed{18}", "5")


RUNAWAY = [
    r"\boxed{(10^9)!}", r"\boxed{\Gamma(10^9)}", r"\boxed{\Gamma(1000000000)}", r"\boxed{\frac{(10^9)!}{3}}",
    r"\boxed{\binom{10^9}{5 \cdot 10^8}}", r"\boxed{\binom{100000000}{50000000}}", r"\boxed{((((9^9)^9)^9)^9)^9}",
    r"\boxed{{{{{{9^9}^9}^9}^9}^9}^9}", r"\boxed{9^{9^{9}}}", r"\boxed{(10^5)!+(10^9)!}", r"#### (10^9)!",
    r"\boxed{2^{(10^4)!}}", r"\boxed{((10^3)!)!}",
]


def test_is_correct_never_hangs_off_the_main_thread():
    """math-verify's own timeout is signal-based and does nothing here: our bounds must hold alone."""
    verdicts = {}

    def grade():
        for text in RUNAWAY:
            verdicts[text] = is_correct(text, "#### 5")

    worker = threading.Thread(target=grade, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), f"is_correct hung after {len(verdicts)} of {len(RUNAWAY)} inputs"
    assert not any(verdicts.values())


def test_modest_combinatorics_still_grade():
    assert is_correct(r"\boxed{5!}", "120")
    assert is_correct(r"\boxed{\binom{5}{2}}", "10")
    assert is_correct(r"\boxed{2^{10}}", "1024")


# ---- opdplus eval -----------------------------------------------------------------------------------------


def _math_file(tmp_path):
    path = tmp_path / "eval.jsonl"
    rows = [{"id": f"q{i}", "question": f"What is {i} + 1?", "answer": f"#### {i + 1}"} for i in range(6)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_eval_rows_carry_id_and_reference_and_limit_takes_the_first_records(models, tmp_path):
    out = tmp_path / "rows.jsonl"
    code = main(["eval", "--model", models["student"], "--task", "math", "--data", str(_math_file(tmp_path)),
                 "--limit", "3", "--max-new-tokens", "2", "--out", str(out), "--no-progress"])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["id"] for row in rows] == ["q0", "q1", "q2"]
    assert [row["reference"] for row in rows] == ["#### 1", "#### 2", "#### 3"]


def test_eval_help_documents_limit(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "first N records" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("task", ["math", "tooluse"])
def test_eval_without_data_names_data(models, task, capsys):
    assert main(["eval", "--model", models["student"], "--task", task, "--no-progress"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--data" in error and "--test-data" not in error


def test_a_result_that_is_not_json_becomes_an_error_message():
    looped = []
    looped.append(looped)

    def loop(n: int) -> list:
        """A tool whose result refers to itself.

        Args:
            n: ignored
        """
        return looped

    from opdplus.tools import ToolBox

    assert ToolBox([loop]).call("loop", {"n": 1}).startswith("error: ")
