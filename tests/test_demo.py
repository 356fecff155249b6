"""`opdplus demo --quick` end to end on the committed tiny models, shortened to two steps per arm; the table's
intervals and milestone column on hand-made metrics."""

import json

import pytest

from opdplus.cli import main
from opdplus.config import TrainConfig
from opdplus.demo import markdown_table, summarize_arm
from opdplus.intervals import gap_closed_range, steps_to_close, wilson_interval

KEYS = {"task", "divergence", "estimator", "teacher_accuracy", "start_accuracy", "final_accuracy", "best_accuracy",
        "final_divergence", "collapsed", "start_interval", "final_interval", "teacher_interval", "gap_closed_range",
        "steps_to_close_20pct", "accuracy_curve", "eval_examples"}


def test_quick_demo_writes_a_well_formed_table(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--quick", "--steps", "2", "--divergences", "rkl,fkl", "--set", "eval_examples=8",
                 "--set", "eval_every=1", "--workers", "2", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["steps"] == 2 and results["settings"]["seed"] == 0
    assert results["settings"]["tasks"] == ["arith"]
    arms = results["arms"]
    assert [(a["divergence"], a["estimator"]) for a in arms] == [
        (divergence, estimator) for divergence in ("rkl", "fkl") for estimator in ("opd", "opd+", "dense")]
    for arm in arms:
        assert KEYS <= arm.keys()
        assert arm["eval_examples"] == 8
        for key in ("teacher", "start", "final"):
            low, high = arm[f"{key}_interval"]
            assert 0.0 <= low <= arm[f"{key}_accuracy"] <= high <= 1.0 and high - low > 0.2  # 8 prompts: wide
            # the interval is the Wilson interval of the count behind the accuracy
            assert (low, high) == pytest.approx(wilson_interval(round(8 * arm[f"{key}_accuracy"]), 8))
        assert [point["step"] for point in arm["accuracy_curve"]] == [0, 1, 2]
        for key in ("teacher_accuracy", "start_accuracy", "final_accuracy", "best_accuracy"):
            assert 0.0 <= arm[key] <= 1.0
        assert arm["teacher_accuracy"] > arm["start_accuracy"]  # the committed teacher is the stronger model
        assert isinstance(arm["collapsed"], bool)
    # every arm starts from the same student: same step-0 accuracy
    assert len({arm["start_accuracy"] for arm in arms}) == 1
    # the dense arm trained: its per-token divergence was logged and its weights moved like the others'
    assert {arm["estimator"] for arm in arms if arm["final_divergence"] > 0} == {"opd", "opd+", "dense"}
    table = (out / "results.md").read_text()
    assert table.count("| arith |") == 6
    assert "Wilson score interval (z = 1.96)" in table
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "| arith | fkl | opd+ |" in printed and "| arith | rkl | dense |" in printed
    # a second run into the same directory is refused, leaving the results as they were
    assert main(["demo", "--quick", "--out", str(out)]) == 2
    assert json.loads((out / "results.json").read_text()) == results


def test_wilson_interval_matches_hand_computed_values():
    # 5 of 10: centre (0.5 + 1.96^2/20) / (1 + 1.96^2/10) = 0.5, half-width 1.96/1.38416 * sqrt(0.025 + 3.8416/400)
    assert wilson_interval(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    # 0 of 10 is not the point [0, 0] of the normal approximation: upper end 3.8416 / 13.8416
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27754), abs=1e-5)
    # 101 of 300 (33.7 %, the arith student's start): about +-5 points, asymmetric toward 50 %
    low, high = wilson_interval(101, 300)
    assert low == pytest.approx(0.28555, abs=1e-5) and high == pytest.approx(0.39191, abs=1e-5)
    with pytest.raises(ValueError, match="correct"):
        wilson_interval(11, 10)


def test_gap_closed_range_takes_the_far_corners():
    # low: final 0.5 against start 0.4; high: final 0.6 against start 0.3 (teacher 1.0 exact)
    assert gap_closed_range((0.5, 0.6), (0.3, 0.4), 1.0) == pytest.approx((0.1 / 0.6, 0.3 / 0.7))
    assert gap_closed_range((0.5, 0.6), (0.3, 1.0), 1.0) is None  # the start interval reaches the teacher


def test_milestone_column_and_not_reached(tmp_path):
    # start 30 %, teacher 80 %: 20 % of the gap is 40 %; the fast arm reaches it at step 20, the slow one never
    curves = {"fast": [0.30, 0.36, 0.41, 0.38], "slow": [0.30, 0.33, 0.35, 0.39]}
    arms = []
    for name, accuracies in curves.items():
        run = tmp_path / name
        run.mkdir()
        records = [{"step": 10 * i, "greedy_accuracy": accuracy} for i, accuracy in enumerate(accuracies)]
        records += [{"step": step, "reverse_kl": 0.5} for step in range(1, 31)]
        (run / "metrics.jsonl").write_text("\n".join(json.dumps(record) for record in records) + "\n")
        config = TrainConfig(task="arith", estimator="dense", steps=30, eval_every=10, eval_examples=100, out=str(run))
        arms.append(summarize_arm(config, teacher_accuracy=0.8))
    fast, slow = arms
    assert fast["steps_to_close_20pct"] == 20 and slow["steps_to_close_20pct"] is None
    assert steps_to_close([(0, 0.3), (10, 0.4)], start=0.3, teacher=0.8, fraction=0.2) == 10  # exactly 20 % counts
    assert fast["final_interval"] == pytest.approx(wilson_interval(38, 100))
    low, high = fast["gap_closed_range"]
    assert fast["gap_closed"] == pytest.approx(0.16) and low < 0.16 < high
    settings = dict(command="opdplus demo", steps=30, prompts_per_step=32, samples_per_prompt=4, lr=1e-4,
                    log_ratio_clip=10.0, eval_examples=100, eval_every=10, wall_seconds=1.0)
    rows = markdown_table({"settings": settings, "arms": arms}).splitlines()
    assert rows[2].startswith("| arith | rkl | dense | 80.0 | 30.0 [") and "| 20 |" in rows[2]
    assert "| not reached |" in rows[3]
    assert "| 38.0 [29.1, 47.8] |" in rows[2]  # Wilson 38 of 100, by hand: 0.2909 and 0.4778


@pytest.mark.parametrize("assignment,hint", [("divergence=fkl", "use --divergences"), ("seed=3", "use --seed"),
                                             ("tensorboard=true", "for each arm")])
def test_demo_refuses_to_set_what_each_arm_sets(tmp_path, capsys, assignment, hint):
    assert main(["demo", "--quick", "--set", assignment, "--out", str(tmp_path / "demo")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and hint in error and assignment.split("=")[0] in error
    assert not (tmp_path / "demo").exists()
