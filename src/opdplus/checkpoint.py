"""Crash-safe run directories: atomic checkpoints, the last K kept, resume from the newest complete one.

A checkpoint is written into a hidden temporary directory, every file fsync'ed, then renamed to
`checkpoint-<step>` in one step: a run killed at any moment leaves either the whole checkpoint or none
under the final name. `trainer_state.json` marks a checkpoint complete; `manifest.json`, written last, holds
every file's size and sha256, so that a resume skips a checkpoint damaged later (disk error, partial copy).
"""

from __future__ import annotations

import fcntl
import fnmatch
import errno
import hashlib
import json
import os
import shutil
import signal
import tempfile
import warnings
from pathlib import Path

import torch

STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"  # size and sha256 of every other file of a checkpoint, written last
RUN_FILES = ("metrics.jsonl", "final", "tensorboard", "config.json")
LOCK_FILE = ".opdplus.lock"  # held (fcntl.flock) by the run using the directory; it holds that run's pid
RUN_CONFIG_KEYS = {"student", "teacher", "divergence", "estimator", "steps"}  # a run's config.json, not a model's
# what save_pretrained writes for a model and its tokenizer: all final/ may hold for a run to replace it
FINAL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
               "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "added_tokens.json", "chat_template.jinja", "chat_template.json", "additional_chat_templates",
               "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model")


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
    except BaseException as error:
        disk_full = is_disk_full(error, tmp)  # asked before the partial files are deleted and free their space
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full:
            raise DiskFullError(final) from error
        raise
    return final


class DiskFullError(OSError):
    """The disk filled up while writing `path` (said in one line: safetensors and torch hide the cause)."""

    def __init__(self, path: Path):
        super().__init__(f"no space left on device writing {path}")


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the file system of `path`."""
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def is_disk_full(error: BaseException, path: Path) -> bool:
    """ENOSPC anywhere in the exception chain, or a writer's error (safetensors, torch's zip writer say only
    "unexpected pos") with under 1 MiB left where it was writing."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    if not isinstance(error, Exception) or isinstance(error, DiskFullError):
        return False
    try:
        return free_bytes(path) < 1 << 20
    except OSError:
        return False


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
    try:
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        if is_disk_full(error, path.parent):
            raise DiskFullError(path) from error
        raise


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
        write_manifest(directory)

    for name, tensor in (weights if weights is not None else model.state_dict()).items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"checkpoint-{step} not written: weight {name} is not finite (a too large --lr or "
                             f"--weight-decay?); the previous checkpoints in {out} are intact")
    path = atomic_directory(out / f"checkpoint-{step}", write)
    for _, old in checkpoints(out)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def write_manifest(directory: Path) -> None:
    """Record the size and sha256 of every file, so that a resume can tell a damaged checkpoint (a disk error,
    a partial copy) from a complete one before loading it."""
    files = {str(path.relative_to(directory)): {"size": path.stat().st_size, "sha256": _sha256(path)}
             for path in sorted(directory.rglob("*")) if path.is_file()}
    (directory / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def verify_checkpoint(path: Path) -> None:
    """Raise ValueError naming the first damaged file of a checkpoint. With a manifest, sizes and hashes are
    compared; an older checkpoint without one is checked by parsing each file (best effort)."""
    manifest = path / MANIFEST
    if not manifest.exists():
        return _verify_by_loading(path)
    try:
        files = json.loads(manifest.read_text())["files"]
        entries = [(name, int(entry["size"]), str(entry["sha256"])) for name, entry in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{manifest} is damaged ({type(error).__name__})") from None
    for name, size, digest in entries:
        file = path / name
        if not file.is_file():
            raise ValueError(f"{file} is missing")
        if file.stat().st_size != size:
            raise ValueError(f"{file} is damaged: {file.stat().st_size} bytes, {size} when saved")
        if _sha256(file) != digest:
            raise ValueError(f"{file} is damaged: its sha256 differs from the one recorded when saved")


def _verify_by_loading(path: Path) -> None:
    from safetensors import safe_open

    for file in sorted(path.rglob("*")):
        try:
            if file.suffix == ".json":
                json.loads(file.read_text())
            elif file.suffix == ".safetensors":
                with safe_open(str(file), framework="pt") as tensors:
                    for key in tensors.keys():
                        tensors.get_slice(key)
            elif file.suffix == ".pt":
                torch.load(file, weights_only=True, map_location="cpu")
        except Exception as error:  # any parser's error: the file cannot be used, whatever the cause
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ValueError(f"{file} is damaged: {reason}") from None


def resumable_checkpoint(out: Path) -> Path | None:
    """The newest checkpoint that verifies, warning (one line) about each newer damaged one; None when there
    is no checkpoint; ValueError naming the damaged file when none is usable."""
    problems = []
    for _, path in reversed(checkpoints(out)):
        try:
            verify_checkpoint(path)
        except ValueError as error:
            problems.append(str(error))
            continue
        for problem in problems:
            warnings.warn(f"{problem}; resuming from the previous complete checkpoint {path}", stacklevel=2)
        return path
    if problems:
        raise ValueError(f"no usable checkpoint to resume from in {out}: {problems[-1]}"
                         + (f" (and {len(problems) - 1} newer damaged)" if len(problems) > 1 else ""))
    return None


def load_training_state(path: Path, scheduler, load_optimizer_state) -> dict:
    """Restore scheduler and RNG from a checkpoint, pass its optimizer state to `load_optimizer_state`
    (weights are loaded with the model)."""
    load_optimizer_state(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    torch.set_rng_state(torch.load(path / "rng.pt", weights_only=True)["torch"])
    return json.loads((path / STATE_FILE).read_text())


def check_run_directory(out: Path, *, resume: bool, overwrite: bool, main: bool = True) -> None:
    """Refuse to mix two runs in one directory unless told to resume or overwrite, to write into a directory that
    holds no run of ours, and to replace anything a run did not write. `main`: this process takes the run's lock
    (other processes of a launch would see it taken). Writes nothing."""
    if out.is_dir():
        if main:
            check_run_lock(out)
        config = out / "config.json"
        if config.exists() and run_config(config) is None:
            raise ValueError(f"output directory {out} holds a model or other files (its config.json is not a run's "
                             "config): pick another --out")
        holds_run = config.exists() or (out / "metrics.jsonl").is_file() or bool(checkpoints(out))
        if not holds_run:
            foreign = sorted(path.name for path in out.iterdir() if not _run_leftover(path.name))
            if foreign:
                raise ValueError(f"output directory {out} is not empty and holds no run "
                                 f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}): "
                                 "pick a new or empty --out")
        elif not (resume or overwrite):
            raise ValueError(f"output directory {out} holds another run; pass --resume to continue it or --overwrite")
        else:
            foreign = foreign_final_files(out / "final")
            if foreign:
                raise ValueError(f"{out / 'final'} holds files a run did not write ({', '.join(foreign[:3])}"
                                 f"{', ...' if len(foreign) > 3 else ''}); move them out: this run replaces final/")
    existing = next((parent for parent in [out, *out.parents] if parent.exists()), None)
    if existing is not None and not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):
        raise ValueError(f"output directory {out} is not writable ({existing} is not a writable directory)")


def run_config(path: Path) -> dict | None:
    """The settings in a run's config.json; None for any other file (a model's config.json, say)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and RUN_CONFIG_KEYS <= data.keys() else None


def stored_run_config(out: Path) -> dict | None:
    """The settings the run in `out` was trained with: its newest readable checkpoint's, else its config.json."""
    for _, path in reversed(checkpoints(out)):
        try:
            config = json.loads((path / STATE_FILE).read_text()).get("config")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(config, dict):
            return config
    return run_config(out / "config.json") if out.is_dir() else None


def foreign_final_files(final: Path) -> list[str]:
    """Names in a run's final/ that save_pretrained does not write (a user's file there must not be replaced)."""
    if not final.is_dir():
        return []
    return sorted(path.name for path in final.iterdir()
                  if not any(fnmatch.fnmatchcase(path.name, pattern) for pattern in FINAL_FILES))


def _run_leftover(name: str) -> bool:
    """The lock file, or a temporary file of a run killed while writing: an empty directory otherwise."""
    return name == LOCK_FILE or fnmatch.fnmatchcase(name, ".*.tmp-*")


_held_locks: dict[Path, object] = {}  # run directory -> the open lock file that holds its lock


def check_run_lock(out: Path) -> None:
    """Refuse a directory another process's run holds (a read-only probe: writes nothing)."""
    release_run_directory(out)  # this process runs one run at a time: an earlier one of it is over
    try:
        handle = open(out / LOCK_FILE)
    except OSError:
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(_in_use(out, handle.read())) from None


def _in_use(out: Path, pid: str) -> str:
    return (f"output directory {out} is in use by another run (pid {pid.strip() or 'unknown'}); wait for it to "
            "finish or pick another --out")


def lock_run_directory(out: Path) -> None:
    """Take the run's exclusive lock on `out` for as long as this process runs it (until release_run_directory)."""
    release_run_directory(out)
    path = out.resolve() / LOCK_FILE
    for _ in range(10):
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            pid = handle.read()
            handle.close()
            raise ValueError(_in_use(out, pid)) from None
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(handle.fileno()).st_ino:
            break
        handle.close()  # locked a file its holder had just removed on release: lock the one at the path now
    else:
        raise ValueError(f"output directory {out}: cannot take the lock {path}; another run keeps replacing it")
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _held_locks[out.resolve()] = handle


def release_run_directory(out: Path) -> None:
    """Give up this process's lock on `out`; the lock file goes first, while still locked (no one else's lock
    is ever removed)."""
    handle = _held_locks.pop(out.resolve(), None)
    if handle is not None:
        Path(handle.name).unlink(missing_ok=True)
        handle.close()


def prepare_run_directory(out: Path, *, overwrite: bool) -> None:
    """Create the run directory and lock it; with overwrite, remove a previous run's files (and only those)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"output directory {out} cannot be created: {error.strerror or error}") from None
    lock_run_directory(out)  # before anything is removed: another run may be writing here
    for stale in out.glob(".*.tmp-*"):  # left by a run killed while writing a checkpoint or file
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    if overwrite:
        for name in RUN_FILES:
            target = out / name
            if name == "final" and target.is_dir():
                if not foreign_final_files(target):  # a file put there since the check stays, and final/ with it
                    shutil.rmtree(target, ignore_errors=True)
            elif name == "config.json" and target.exists() and run_config(target) is None:
                continue
            else:
                shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
        for _, path in checkpoints(out):
            shutil.rmtree(path, ignore_errors=True)
