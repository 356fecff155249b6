"""`opdplus demo --quick` end to end on the committed tiny models, shortened to two steps per arm."""

import json

from opdplus.cli import main

KEYS = {"task", "divergence", "estimator", "teacher_accuracy", "start_accuracy", "final_accuracy", "best_accuracy",
        "final_divergence", "collapsed"}


def test_quick_demo_writes_a_well_formed_table(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--quick", "--steps", "2", "--divergences", "rkl,fkl", "--set", "eval_examples=8",
                 "--set", "eval_every=1", "--workers", "2", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["steps"] == 2 and results["settings"]["seed"] == 0
    assert results["settings"]["tasks"] == ["arith"]
    arms = results["arms"]
    assert [(a["divergence"], a["estimator"]) for a in arms] == [("rkl", "opd"), ("rkl", "opd+"), ("fkl", "opd"),
                                                                ("fkl", "opd+")]
    for arm in arms:
        assert KEYS <= arm.keys()
        for key in ("teacher_accuracy", "start_accuracy", "final_accuracy", "best_accuracy"):
            assert 0.0 <= arm[key] <= 1.0
        assert arm["teacher_accuracy"] > arm["start_accuracy"]  # the committed teacher is the stronger model
        assert isinstance(arm["collapsed"], bool)
    # every arm starts from the same student: same step-0 accuracy
    assert len({arm["start_accuracy"] for arm in arms}) == 1
    table = (out / "results.md").read_text()
    assert table.count("| arith |") == 4
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "| arith | fkl | opd+ |" in capsys.readouterr().out
    # a second run into the same directory is refused, leaving the results as they were
    assert main(["demo", "--quick", "--out", str(out)]) == 2
    assert json.loads((out / "results.json").read_text()) == results
