"""The run directory: a run only ever deletes or replaces what a run wrote, --resume never changes a run silently,
and two runs never share one directory. Every refusal is one line and leaves the directory as it was."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from opdplus.cli import main

SMALL = ["--prompts-per-step", "2", "--samples-per-prompt", "2", "--max-new-tokens", "8", "--eval-every", "0",
         "--eval-examples", "2", "--no-tensorboard", "--no-progress"]


def train_argv(models, out, *extra, steps=1):
    return ["train", "--student", models["student"], "--teacher", models["teacher"], "--out", str(out),
            "--steps", str(steps), *SMALL, *extra]


def snapshot(path: Path) -> dict:
    """relative path -> sha256 (files) or "dir"."""
    return {str(item.relative_to(path)): "dir" if item.is_dir() else hashlib.sha256(item.read_bytes()).hexdigest()
            for item in sorted(Path(path).rglob("*"))}


@pytest.fixture(scope="module")
def prior_run(models, tmp_path_factory):
    """A finished 1-step run with a checkpoint at step 1."""
    out = tmp_path_factory.mktemp("prior") / "run"
    assert main(train_argv(models, out, "--save-every", "1")) == 0
    return out


def refused(argv, capsys, *expected) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0, error
    for text in expected:
        assert text in error, error
    return error


def test_overwrite_refuses_when_final_holds_a_users_file(models, prior_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(prior_run, out)
    (out / "final" / "thesis.tex").write_text("\\documentclass{article}\n")
    before = snapshot(out)
    refused(train_argv(models, out, "--overwrite"), capsys, "thesis.tex", str(out / "final"))
    refused(train_argv(models, out, "--resume", "--steps", "2"), capsys, "thesis.tex")
    assert snapshot(out) == before


def test_overwrite_removes_only_run_files(models, prior_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(prior_run, out)
    (out / "notes.txt").write_text("mine\n")
    (out / "data").mkdir()
    (out / "data" / "train.jsonl").write_text("{}\n")
    assert main(train_argv(models, out, "--overwrite")) == 0
    assert (out / "notes.txt").read_text() == "mine\n" and (out / "data" / "train.jsonl").read_text() == "{}\n"
    assert not list(out.glob("checkpoint-*")) and (out / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("flag", ["--resume", "--overwrite", None])
def test_a_model_directory_as_out_is_refused_and_kept(models, tmp_path, capsys, flag):
    out = tmp_path / "model"
    shutil.copytree(models["student"], out)
    before = snapshot(out)
    refused(train_argv(models, out, *([flag] if flag else [])), capsys, str(out), "config.json")
    assert snapshot(out) == before


@pytest.mark.parametrize("flag", ["--resume", "--overwrite", None])
def test_a_directory_of_user_files_is_refused_not_written_into(models, tmp_path, capsys, flag):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    refused(train_argv(models, out, *([flag] if flag else [])), capsys, str(out), "notes.txt")
    assert snapshot(out) == {"notes.txt": hashlib.sha256(b"mine\n").hexdigest()}


def test_an_empty_directory_is_a_fine_out(models, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert main(train_argv(models, out)) == 0
    assert (out / "final" / "model.safetensors").is_file()


def test_resume_with_a_different_run_definition_is_refused(models, prior_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(prior_run, out)
    before = snapshot(out)
    error = refused(train_argv(models, out, "--resume", "--steps", "2", "--lr", "0.5", "--divergence", "fkl",
                               "--seed", "7"), capsys, "--resume", "divergence", "lr", "seed")
    assert "steps" not in error.replace("save_every", "")  # what may change is not listed
    for flags in (["--estimator", "opd"], ["--gamma", "0.5"], ["--student", models["teacher"]]):
        refused(train_argv(models, out, "--resume", *flags), capsys, flags[0].removeprefix("--"))
    assert snapshot(out) == before


def test_resume_without_a_checkpoint_compares_with_config_json(models, prior_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(prior_run, out)
    shutil.rmtree(out / "checkpoint-1")
    before = snapshot(out)
    refused(train_argv(models, out, "--resume", "--lr", "0.5"), capsys, "lr")
    assert snapshot(out) == before


def test_resume_applies_and_logs_what_may_change(models, prior_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(prior_run, out)
    capsys.readouterr()
    assert main(train_argv(models, out, "--resume", "--save-every", "2", "--keep-last", "3", steps=2)) == 0
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if "--resume" in line and "steps" in line]
    assert len(lines) == 1 and "save_every" in lines[0] and "keep_last" in lines[0], captured
    config = json.loads((out / "config.json").read_text())
    assert (config["steps"], config["save_every"], config["keep_last"]) == (2, 2, 3)
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]


HOLD_LOCK = """
import fcntl, os, sys, time
handle = open(sys.argv[1], "a+")
fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
handle.truncate(0); handle.write(str(os.getpid())); handle.flush()
print("locked", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("flag", ["--resume", "--overwrite"])
def test_a_second_run_on_a_directory_in_use_is_refused_naming_the_first(models, prior_run, tmp_path, capsys, flag):
    out = tmp_path / "run"
    shutil.copytree(prior_run, out)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out / ".opdplus.lock")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(out)
        refused(train_argv(models, out, flag, steps=2), capsys, str(out), f"pid {holder.pid}")
        assert snapshot(out) == before
    finally:
        holder.kill()
        holder.wait()
    assert main(train_argv(models, out, flag, steps=2)) == 0  # released with its holder
