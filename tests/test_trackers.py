"""--report-to: the rows of metrics.jsonl also go to TensorBoard, Weights & Biases (offline here) and Trackio, as TRL
users expect; an unknown or uninstalled tracker is one line before anything is written."""

import json
import math
import subprocess
import sys
import textwrap

import pytest

from opdplus.cli import main
from opdplus.metrics import MetricsLog
from test_run_directory import refused, train_argv


def test_unknown_tracker_is_one_line_listing_the_valid_ones(models, tmp_path, capsys):
    out = tmp_path / "run"
    refused(train_argv(models, out, "--report-to", "tensorbord,wandb"), capsys,
            "report_to", "'tensorbord'", "tensorboard, wandb, trackio, none")
    assert not out.exists()


def test_uninstalled_tracker_fails_before_the_run_directory_naming_the_extra(models, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if wandb were not installed
    out = tmp_path / "run"
    refused(train_argv(models, out, "--report-to", "wandb"), capsys, "pip install 'opdplus[wandb]'")
    assert not out.exists()


def scalars_of(metrics: list[dict]) -> dict:
    """{(key, step): value} of every number metrics.jsonl holds, as the trackers receive them."""
    return {(key, row["step"]): float(value) for row in metrics for key, value in row.items()
            if key != "step" and isinstance(value, (int, float))}


def test_tensorboard_and_wandb_get_the_rows_of_metrics_jsonl_and_resume_appends(models, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    # --no-tensorboard (in SMALL) is overridden by naming tensorboard in --report-to
    assert main(train_argv(models, out, "--report-to", "tensorboard,wandb", "--save-every", "1", steps=2)) == 0
    assert json.loads((out / "config.json").read_text())["report_to"] == "tensorboard,wandb"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    expected = scalars_of(metrics)
    assert {step for _, step in expected} == {0, 1, 2}

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    logged = {(key, event.step): event.value for key in events.Tags()["scalars"] for event in events.Scalars(key)}
    assert logged.keys() == expected.keys()
    for key, value in expected.items():
        assert math.isclose(logged[key], value, rel_tol=1e-6, abs_tol=1e-30) or (math.isnan(value)
                                                                                  and math.isnan(logged[key])), key

    run_id = (out / "wandb" / "opdplus-run-id").read_text().strip()
    first = sorted(out.glob("wandb/offline-run-*"))
    assert [path.name.endswith("-" + run_id) for path in first] == [True]
    assert (first[0] / f"run-{run_id}.wandb").stat().st_size > 0

    # resume: the same wandb run (its id kept), the same TensorBoard directory; nothing else of the run touched
    assert main(train_argv(models, out, "--report-to", "tensorboard,wandb", "--save-every", "1", "--resume",
                           steps=3)) == 0
    assert (out / "wandb" / "opdplus-run-id").read_text().strip() == run_id
    runs = sorted(out.glob("wandb/offline-run-*"))
    assert len(runs) == 2 and all(path.name.endswith("-" + run_id) for path in runs)
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert sorted(event.step for event in events.Scalars("loss")) == [1, 2, 3]


def test_trackers_are_closed_when_the_run_fails(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    with pytest.raises(RuntimeError, match="boom"):
        with MetricsLog(tmp_path, keep_through=-1, tensorboard=True, report_to=["wandb"], config={"lr": 0.1}) as log:
            log.write({"step": 0, "loss": 1.5, "bad_rollouts": []})
            assert wandb.run is not None and wandb.run.config["lr"] == 0.1
            raise RuntimeError("boom")
    assert wandb.run is None  # finished (marked failed), not left open until the interpreter exits
    assert log.trackers == []


def test_trackio_gets_the_rows(tmp_path):
    pytest.importorskip("trackio")
    script = textwrap.dedent("""
        import sys
        from pathlib import Path
        from opdplus.metrics import MetricsLog
        out = Path(sys.argv[1]) / "myrun"
        out.mkdir()
        with MetricsLog(out, keep_through=-1, tensorboard=False, report_to=["trackio"], config={"lr": 0.1}) as log:
            log.write({"step": 0, "loss": 1.5})
            log.write({"step": 1, "loss": 0.5, "bad_rollouts": [3]})
        from trackio.sqlite_storage import SQLiteStorage
        print(sorted((row["step"], row["loss"]) for row in SQLiteStorage.get_logs("opdplus", "myrun")))
    """)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TRACKIO_DIR": str(tmp_path / "trackio"),
           "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[(0, 1.5), (1, 0.5)]"
