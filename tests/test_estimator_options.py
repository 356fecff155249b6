"""The dense and top-k estimators and the outcome reward from the command line: what a user can get wrong is
refused in one line before the run directory exists, and what is right trains end to end."""

import json

import pytest

from opdplus.cli import main
from test_hostile_config import SMALL, run_train

SERVED = "http://127.0.0.1:9"  # nothing listens there: the check must come before any request


@pytest.mark.parametrize("flags,message", [
    (["--estimator", "dense", "--teacher", SERVED], "--estimator dense needs a local teacher"),
    (["--estimator", "topk:0"], "estimator must be one of opd, opd+, dense, topk:K"),
    (["--estimator", "topk:x"], "estimator must be one of opd, opd+, dense, topk:K"),
    (["--reward-weight", "-1"], "reward_weight must be a finite number >= 0, got -1"),
])
def test_bad_estimator_settings_are_one_line(tmp_path, capsys, flags, message):
    status, line = run_train(tmp_path, capsys, *flags)
    assert status == 2 and message in line


def test_dense_with_several_teachers_is_refused(tmp_path, capsys):
    status, line = run_train(tmp_path, capsys, "--estimator", "dense",
                             config_text="teachers:\n  second: tiny:arith-teacher\n")
    assert status == 2 and "dense with several teachers is not supported" in line


@pytest.mark.parametrize("estimator", ["dense", "topk:4"])
def test_dense_and_top_k_with_an_outcome_reward_train(tmp_path, capsys, estimator):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--steps", "2", "--divergence", "fkl", "--estimator", estimator,
                 "--reward-weight", "0.5", "--gamma", "1", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert row["skipped_update"] == 0 and row["divergence"] > 0 and 0 < row["distillation_share"] <= 1
        assert 0 <= row["reward_mean"] <= 1
    assert (out / "final" / "model.safetensors").is_file()
