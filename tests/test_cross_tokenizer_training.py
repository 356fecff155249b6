"""Training against a teacher with another tokenizer, end to end through `opdplus train` (issue 17).

(a) A teacher that is the student's own teacher with a permuted vocabulary (same strings, other ids, built
independently in tests/permuted.py) must train exactly as the plain run: the ids are mapped one to one, so every
logged metric and the final weights agree.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from safetensors.torch import load_file

from opdplus.cli import main
from permuted import write_permuted_copy
from test_run_directory import SMALL

TIMES = ("time_",)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train(student: str, teacher: str, out: Path, *extra: str, steps: int = 3) -> list[dict]:
    argv = ["train", "--student", student, "--teacher", teacher, "--out", str(out), "--steps", str(steps),
            "--seed", "3", *SMALL, *extra]
    assert main(argv) == 0
    return metrics(out)


def assert_same_metrics(plain: list[dict], other: list[dict], tolerance: float) -> int:
    """Every numeric metric of every step agrees (timings aside); returns how many values were compared."""
    assert len(plain) == len(other)
    compared = 0
    for first, second in zip(plain, other):
        assert set(first) == set(second), set(first) ^ set(second)
        for key, value in first.items():
            if key.startswith(TIMES) or not isinstance(value, (int, float)):
                continue
            assert math.isclose(value, second[key], rel_tol=tolerance, abs_tol=tolerance), (first["step"], key)
            compared += 1
    return compared


@pytest.fixture(scope="module")
def permuted_teacher(tmp_path_factory):
    return str(write_permuted_copy("tiny:arith-teacher", tmp_path_factory.mktemp("permuted") / "teacher", seed=5))


@pytest.mark.parametrize("extra", [
    (),
    ("--divergence", "fkl", "--gamma", "0.5", "--ppo-epochs", "2", "--micro-batch-size", "3"),
], ids=["rkl", "fkl-gamma-ppo"])
def test_permuted_vocabulary_teacher_trains_as_the_plain_run(permuted_teacher, tmp_path, capsys, extra):
    plain = train("tiny:arith-student", "tiny:arith-teacher", tmp_path / "plain", *extra)
    capsys.readouterr()
    permuted = train("tiny:arith-student", permuted_teacher, tmp_path / "permuted", *extra)
    assert "has another tokenizer: its ids are mapped one to one" in capsys.readouterr().out
    assert assert_same_metrics(plain, permuted, 1e-5) > 30
    before = load_file(tmp_path / "plain" / "final" / "model.safetensors")
    after = load_file(tmp_path / "permuted" / "final" / "model.safetensors")
    assert max(float((before[name] - after[name]).abs().max()) for name in before) < 1e-5


def test_span_path_with_one_token_per_span_trains_as_the_plain_run_at_gamma_zero(permuted_teacher, tmp_path,
                                                                                  capsys, monkeypatch):
    # the permuted character-level teacher forced through the span path: re-tokenized, aligned, scored per span.
    # Every span is one character, and at gamma = 0 a span's advantage is its own weight alone, so the run is the
    # plain one; this covers the whole span path of the trainer (alignment, SpanScores, the loss, the metrics).
    from opdplus.teachers import cross

    extra = ("--divergence", "jsd", "--ppo-epochs", "2", "--micro-batch-size", "3")
    plain = train("tiny:arith-student", "tiny:arith-teacher", tmp_path / "plain", *extra)
    monkeypatch.setattr(cross, "_relation", lambda student, teacher: ("spans", None))
    capsys.readouterr()
    spans = train("tiny:arith-student", permuted_teacher, tmp_path / "spans", *extra)
    assert "span-level OPD+" in capsys.readouterr().out
    assert [record.pop("tokens_per_span", None) for record in spans[1:]] == [1.0] * 3  # one character per span
    assert assert_same_metrics(plain, spans, 1e-5) > 30


def test_refusals_are_one_line_before_anything_is_written(permuted_teacher, tmp_path, capsys):
    from test_run_directory import refused

    out = tmp_path / "run"
    base = ["train", "--student", "tiny:arith-student", "--out", str(out), "--steps", "1", *SMALL]
    refused([*base, "--teacher", permuted_teacher, "--estimator", "dense"], capsys,
            "--estimator dense needs a teacher that reads the student's token ids", permuted_teacher)
    refused([*base, "--teacher", "tiny:arith-teacher", "--teacher-tokenizer", "tiny:arith-student"], capsys,
            "unknown option 'tokenizer' for a local teacher")
    refused([*base, "--teacher", "tiny:arith-teacher", "--teacher-system-prompt", " "], capsys,
            "system_prompt", "non-empty string")
    assert not out.exists()


def test_a_privileged_system_prompt_changes_what_the_teacher_scores(tmp_path, capsys):
    plain = train("tiny:arith-student", "tiny:arith-teacher", tmp_path / "plain", steps=1)
    hinted = train("tiny:arith-student", "tiny:arith-teacher", tmp_path / "hinted",
                   "--teacher-system-prompt", "Think step by step.", steps=1)
    assert "another tokenizer" not in capsys.readouterr().out
    # the same samples (the student and the seed are the same), scored after another prompt
    assert plain[1]["response_length"] == hinted[1]["response_length"]
    assert abs(plain[1]["log_ratio_mean"] - hinted[1]["log_ratio_mean"]) > 1e-3


def test_the_built_in_bpe_teacher_trains_the_char_student_by_spans(tmp_path, capsys):
    records = train("tiny:arith-student", "tiny:arith-teacher-bpe", tmp_path / "bpe", "--gamma", "1", steps=2)
    assert "span-level OPD+" in capsys.readouterr().out
    for record in records[1:]:
        assert record["skipped_update"] == 0 and math.isfinite(record["loss"])
        assert 1.2 < record["tokens_per_span"] < 3  # digits merge with the operator after them: spans of 1-2 chars
