"""Crash-safe run directories: atomic checkpoints, the last K kept, resume from the newest complete one.

A checkpoint is written into a hidden temporary directory, every file fsync'ed, then renamed to
`checkpoint-<step>` in one step: a run killed at any moment leaves either the whole checkpoint or none
under the final name. `trainer_state.json` is written last and marks a checkpoint complete.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from pathlib import Path

import torch

STATE_FILE = "trainer_state.json"
RUN_FILES = ("metrics.jsonl", "final", "tensorboard", "config.json")


def failpoint(name: str) -> None:
    """Die here with SIGKILL when OPDPLUS_FAILPOINT names this point (crash tests of resume)."""
    if os.environ.get("OPDPLUS_FAILPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*")) + [directory]:
        _fsync_path(path)


def atomic_directory(final: Path, write) -> Path:
    """Call write(tmp_dir), fsync it, then rename it to `final` (replacing an older one)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a checkpoint is as readable as any other output
    try:
        write(tmp)
        failpoint(f"write:{final.name}")
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_path(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's entry list is what makes a rename durable)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file through a temporary sibling and a rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in `out`, oldest first."""
    found = []
    for path in out.glob("checkpoint-*"):
        suffix = path.name.removeprefix("checkpoint-")
        if suffix.isdigit() and (path / STATE_FILE).is_file():
            found.append((int(suffix), path))
    return sorted(found)


def save_checkpoint(out: Path, step: int, model, tokenizer, optimizer_state: dict, scheduler, state: dict,
                    keep_last: int, *, weights: dict | None = None) -> Path:
    """Write checkpoint-<step>, then drop all but the newest `keep_last`. `weights`: the model's full state dict
    when `model` itself holds only a shard of it (FSDP)."""
    def write(directory: Path) -> None:
        model.save_pretrained(directory, safe_serialization=True, state_dict=weights)
        tokenizer.save_pretrained(directory)
        torch.save(optimizer_state, directory / "optimizer.pt")
        torch.save(scheduler.state_dict(), directory / "scheduler.pt")
        torch.save({"torch": torch.get_rng_state()}, directory / "rng.pt")
        (directory / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=2))

    path = atomic_directory(out / f"checkpoint-{step}", write)
    for _, old in checkpoints(out)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_training_state(path: Path, scheduler, load_optimizer_state) -> dict:
    """Restore scheduler and RNG from a checkpoint, pass its optimizer state to `load_optimizer_state`
    (weights are loaded with the model)."""
    load_optimizer_state(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    torch.set_rng_state(torch.load(path / "rng.pt", weights_only=True)["torch"])
    return json.loads((path / STATE_FILE).read_text())


def check_run_directory(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to mix two runs in one directory unless told to resume or overwrite. Writes nothing."""
    holds_run = out.is_dir() and (any((out / name).exists() for name in RUN_FILES) or bool(checkpoints(out)))
    if holds_run and not (resume or overwrite):
        raise ValueError(f"output directory {out} holds another run; pass --resume to continue it or --overwrite")
    existing = next((parent for parent in [out, *out.parents] if parent.exists()), None)
    if existing is not None and not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):
        raise ValueError(f"output directory {out} is not writable ({existing} is not a writable directory)")


def prepare_run_directory(out: Path, *, overwrite: bool) -> None:
    """Create the run directory; with overwrite, remove a previous run's files (and only those)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"output directory {out} cannot be created: {error.strerror or error}") from None
    for stale in out.glob(".*.tmp-*"):  # left by a run killed while writing a checkpoint or file
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    if overwrite:
        for name in RUN_FILES:
            target = out / name
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
        for _, path in checkpoints(out):
            shutil.rmtree(path, ignore_errors=True)
