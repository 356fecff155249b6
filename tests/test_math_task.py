import importlib.util
import itertools
import json
import random
import threading
from pathlib import Path

import pytest

from opdplus.rollout.evaluation import avg_at_k, pass_at_k
from opdplus.tasks.data import load_records, sample_cycled
from opdplus.tasks.math import MathTask, extract_reference, is_correct

FIXTURES = Path(__file__).parent / "fixtures"
GSM8K = str(FIXTURES / "gsm8k_mini.jsonl")
SOLUTION_18 = "She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18"


@pytest.mark.parametrize(
    "reference, answer",
    [
        (SOLUTION_18, "18"),
        ("so the total is\n#### 1,000", "1000"),
        ("#### -7", "-7"),
        ("Thus $x = \\boxed{\\frac{1}{\\sqrt{2}}}$.", "\\frac{1}{\\sqrt{2}}"),
        ("\\boxed{3} then \\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        (" 42 ", "42"),
    ],
)
def test_extract_reference(reference, answer):
    assert extract_reference(reference) == answer


@pytest.mark.parametrize(
    "completion",
    [
        "The answer is 18.",
        "#### 18",
        "\\boxed{18}",
        "18 dollars",
        "$18.00",
        "work... 17 eggs, then \\boxed{18}",
        "I first guessed \\boxed{17}, but it is \\boxed{18}",
        "Reasoning 16 - 3 - 4 = 9.\n#### 18",
        SOLUTION_18,
    ],
)
def test_correct_completions_against_a_gsm8k_reference(completion):
    assert is_correct(completion, SOLUTION_18)


@pytest.mark.parametrize(
    "completion", ["17", "The answer is 17.", "#### 17", "\\boxed{17}", "so 18\n#### 17", "18 or 17", "", "no idea"]
)
def test_wrong_completions_against_a_gsm8k_reference(completion):
    assert not is_correct(completion, SOLUTION_18)


@pytest.mark.parametrize(
    "completion, reference, expected",
    [
        ("1,000", "#### 1000", True),
        ("1000", "#### 1,000", True),
        ("The answer is 1,000.", "1000", True),
        ("0.5", "\\boxed{\\frac{1}{2}}", True),
        ("$\\frac{1}{2}$", "0.5", True),
        ("\\boxed{1/2}", "\\frac{1}{2}", True),
        ("\\boxed{0.4}", "\\frac{1}{2}", False),
        ("\\boxed{x^2 + 1}", "Hence \\boxed{1 + x^2}.", True),
        ("\\boxed{x^2 + 2}", "Hence \\boxed{1 + x^2}.", False),
        ("#### -7", "-7", True),
        ("#### 7", "-7", False),
    ],
)
def test_boxed_and_bare_references(completion, reference, expected):
    assert is_correct(completion, reference) is expected


@pytest.mark.parametrize(
    "completion",
    [
        "9^9^9^9",
        "\\boxed{9^{9^{9}}}",
        "\\boxed{10^{100000}}",
        "\\boxed{100000!}",
        "\\boxed{",
        "}}}{{{",
        "#### ",
        "\\frac{\\frac{\\frac{",
        "$" * 1000,
        "1" * 10000,
        "\x00\ud800",
        "⁹⁹ ½ ∞ \\infty",
    ],
)
def test_malformed_and_explosive_completions_are_wrong_and_fast(completion):
    assert is_correct(completion, SOLUTION_18) is False


def test_is_correct_never_raises_on_odd_inputs():
    assert is_correct(None, SOLUTION_18) is False
    assert is_correct("18", "") is False
    assert is_correct("18", None) is False


def test_is_correct_works_outside_the_main_thread():
    # math-verify's signal-based timeouts only work in the main thread; off it we disable them.
    results = []
    worker = threading.Thread(
        target=lambda: results.extend(
            [is_correct("#### 18", SOLUTION_18), is_correct("#### 17", SOLUTION_18), is_correct("9^9^9^9", SOLUTION_18)]
        )
    )
    worker.start()
    worker.join(timeout=60)
    assert results == [True, False, False]


def test_math_task_on_a_gsm8k_file():
    task = MathTask(train_path=GSM8K, test_path=GSM8K)
    examples = task.examples("train", 12, seed=1)  # more than the 5 records: cycles
    assert len(examples) == 12 and len({e.prompt for e in examples}) == 5
    assert examples == task.examples("train", 12, seed=1)
    assert examples != task.examples("train", 12, seed=2)
    for example in examples:
        assert example.prompt.endswith("after ####.")
        assert "<<" not in example.response  # calculator markup stripped from the gold solution
        assert task.verify(example.response, example)
        assert not task.verify("#### 123456", example)
        json.dumps(example.reference)


def test_math_task_options_and_split_errors(tmp_path):
    path = tmp_path / "problems.json"
    path.write_text(
        json.dumps({"data": [{"problem": "1+1?", "solution": "\\boxed{2}"}, {"problem": "2+2?", "solution": "4"}]})
    )
    task = MathTask(test_path=str(path), question_field="problem", answer_field="solution", prompt_suffix="")
    examples = task.examples("test", 2)
    assert {e.prompt for e in examples} == {"1+1?", "2+2?"}
    assert {e.response for e in examples} == {"\\boxed{2}", "#### 4"}
    assert all(task.verify(e.response, e) for e in examples)
    with pytest.raises(ValueError, match="no train data"):
        task.examples("train", 1)
    with pytest.raises(ValueError, match="split must be"):
        task.examples("validation", 1)


# ---- loader errors --------------------------------------------------------------------


def test_loader_reads_jsonl_json_list_and_wrapped_list(tmp_path):
    records = [{"question": "q1", "answer": "#### 1"}, {"question": "q2", "answer": "#### 2"}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    (tmp_path / "b.json").write_text(json.dumps(records))
    (tmp_path / "c.json").write_text(json.dumps({"version": 1, "rows": records}))
    (tmp_path / "d.json").write_text("\n".join(json.dumps(r) for r in records))  # JSONL named .json (BFCL)
    for name in "a.jsonl", "b.json", "c.json", "d.json":
        assert load_records(str(tmp_path / name), fields=["question", "answer"]) == records


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.jsonl", "  \n", r"data file is empty: .*empty\.jsonl$"),
        ("bad.jsonl", '{"question": "q", "answer": "1"}\n{"question": "q", \n', r"bad\.jsonl:2: invalid JSON: "),
        (
            "missing.jsonl",
            '{"question": "q", "answer": "1"}\n\n{"question": "q"}\n',
            r"missing\.jsonl:3: missing field 'answer'$",
        ),
        (
            "list.json",
            '[{"question": "q", "answer": "1"}, {"answer": "2"}]',
            r"list\.json: record 2: missing field 'question'$",
        ),
        (
            "scalar.jsonl",
            '{"question": "q", "answer": "1"}\n[1, 2]\n',
            r"scalar\.jsonl:2: expected a JSON object, got list$",
        ),
        ("none.json", "[]", r"no records in "),
        ("broken.json", '[\n{"question": "q",\n "answer": }\n]', r"broken\.json:3: invalid JSON: "),
    ],
)
def test_loader_errors_are_one_clear_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        load_records(str(path), fields=["question", "answer"])
    assert "\n" not in str(error.value)


def test_loader_missing_file(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match=r"^data file not found: .*nope\.jsonl$"):
        load_records(missing, fields=["question"])


def test_loader_reads_parquet(tmp_path):
    pytest.importorskip("pyarrow")
    import pyarrow
    import pyarrow.parquet

    records = [{"question": "q1", "answer": "#### 1"}, {"question": "q2", "answer": "#### 2"}]
    path = str(tmp_path / "train.parquet")
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(records), path)
    assert load_records(path, fields=["question", "answer"]) == records
    with pytest.raises(ValueError, match=r"train\.parquet: record 1: missing field 'solution'$"):
        load_records(path, fields=["solution"])


@pytest.mark.skipif(
    any(importlib.util.find_spec(name) for name in ("pyarrow", "datasets")), reason="a Parquet reader is installed"
)
def test_parquet_without_a_reader_names_the_package_to_install(tmp_path):
    path = tmp_path / "train.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(ImportError, match="pip install pyarrow"):
        load_records(str(path), fields=["question"])


def test_sample_cycled_is_a_seeded_permutation_per_pass():
    items = list(range(7))
    drawn = sample_cycled(items, 21, seed="s")
    assert all(sorted(drawn[i : i + 7]) == items for i in (0, 7, 14))
    assert drawn == sample_cycled(items, 21, seed="s")


# ---- metrics --------------------------------------------------------------------------


def brute_force_pass_at_k(flags, k):
    """Fraction of all k-subsets of the samples that hold at least one correct sample."""
    subsets = list(itertools.combinations(flags, k))
    return sum(any(subset) for subset in subsets) / len(subsets)


def test_pass_at_k_matches_brute_force():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 8)
        flags_per_prompt = [[rng.random() < 0.4 for _ in range(n)] for _ in range(rng.randint(1, 4))]
        k = rng.randint(1, n)
        expected = sum(brute_force_pass_at_k(f, k) for f in flags_per_prompt) / len(flags_per_prompt)
        assert pass_at_k(flags_per_prompt, k) == pytest.approx(expected)


def test_pass_at_k_and_avg_at_k_edge_cases():
    assert pass_at_k([[True, False, False, False]], 1) == pytest.approx(0.25)
    assert pass_at_k([[False] * 5], 3) == 0.0 and pass_at_k([[True] * 5], 5) == 1.0
    assert avg_at_k([[True, False, True, True], [False, False, True, True]], 2) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        pass_at_k([[True, False]], 3)
    with pytest.raises(ValueError):
        avg_at_k([[True]], 0)
