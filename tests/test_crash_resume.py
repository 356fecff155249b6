"""A real training process killed with SIGKILL (during rollout, after an update, while writing a checkpoint)
resumes with --resume to exactly the weights of an uninterrupted run."""

import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file


def run(models, out, *extra, failpoint=None):
    command = [sys.executable, "-m", "opdplus.cli", "train", "--student", models["student"], "--teacher",
               models["teacher"], "--out", str(out), "--task", "arith", "--divergence", "fkl", "--steps", "5",
               "--prompts-per-step", "4", "--samples-per-prompt", "2", "--max-new-tokens", "12", "--eval-every", "0",
               "--save-every", "2", "--no-tensorboard", "--no-progress", "--seed", "1", *extra]
    environment = {**os.environ, "OPDPLUS_FAILPOINT": failpoint or ""}
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert run(models, out).returncode == 0
    return load_file(str(out / "final" / "model.safetensors"))


@pytest.mark.parametrize("point", ["rollout:3", "update:4", "write:checkpoint-4", "write:final"])
def test_killed_run_resumes_to_identical_weights(models, reference, tmp_path, point):
    out = tmp_path / "run"
    killed = run(models, out, failpoint=point)
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "final").exists()
    # no half-written checkpoint under a final name
    for checkpoint in out.glob("checkpoint-*"):
        assert (checkpoint / "trainer_state.json").is_file() and (checkpoint / "model.safetensors").is_file()
    resumed = run(models, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    weights = load_file(str(out / "final" / "model.safetensors"))
    assert all(torch.equal(weights[name], reference[name]) for name in reference)
    steps = [line for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 6  # step 0 (eval) + 5 steps, none logged twice
    assert not list(out.glob(".*.tmp-*"))
