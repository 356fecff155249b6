"""What a run writes about itself while it trains: metrics.jsonl, the --report-to trackers (TensorBoard, wandb,
Trackio), timings."""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from pathlib import Path

import torch

from opdplus.checkpoint import DiskFullError, atomic_write_text, is_disk_full
from opdplus.trackers import close_trackers, start_trackers, tracker_names


class MetricsLog:
    """metrics.jsonl (one JSON object per step) and, optionally, the same numbers sent to trackers.

    On resume the file is cut back to the checkpoint's step, so a step is never logged twice.
    """

    def __init__(self, out: Path, keep_through: int, tensorboard: bool, enabled: bool = True,
                 report_to: str | list | None = None, config: dict | None = None):
        self.enabled, self.last_accuracy, self.handle, self.trackers = enabled, float("nan"), None, []
        if not enabled:  # a data-parallel worker other than process 0
            return
        self.path = out / "metrics.jsonl"
        kept = [line for line, record in self._read_records() if record["step"] <= keep_through]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self.last_accuracy = next((json.loads(line)["greedy_accuracy"] for line in reversed(kept)
                                   if "greedy_accuracy" in json.loads(line)), float("nan"))
        self.handle = open(self.path, "a")
        names = tracker_names(report_to)  # --report-to; --tensorboard (on by default) adds TensorBoard
        names = ["tensorboard"] * (tensorboard and "tensorboard" not in names) + names
        try:
            self.trackers = start_trackers(names, out, keep_through, config or {})
        except BaseException:
            self.handle.close()
            raise

    def _read_records(self) -> list[tuple[str, dict]]:
        """(line, record) of an existing metrics.jsonl. A torn last line (a run killed mid-write) is dropped with a
        warning; a damaged line elsewhere is an error naming metrics.jsonl:LINE."""
        if not self.path.exists():
            return []
        lines = self.path.read_text(errors="replace").splitlines()
        last = max((number for number, line in enumerate(lines, 1) if line.strip()), default=0)
        records = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                valid = isinstance(record, dict) and isinstance(record.get("step"), int)
            except ValueError:
                valid = False
            if valid:
                records.append((line, record))
            elif number == last:
                warnings.warn(f"{self.path}:{number}: torn last line (a run stopped while writing it) dropped",
                              stacklevel=3)
            else:
                raise ValueError(f"{self.path}:{number}: not a metrics record (a JSON object with an integer "
                                 "'step'); fix or delete the line, then resume again")
        return records

    def write(self, record: dict) -> dict:
        if not self.enabled:
            return record
        try:
            self.handle.write(json.dumps(record) + "\n")
            self.handle.flush()
        except OSError as error:
            if is_disk_full(error, self.path.parent):
                raise DiskFullError(self.path) from error
            raise
        if "greedy_accuracy" in record:
            self.last_accuracy = record["greedy_accuracy"]
        scalars = {key: value for key, value in record.items() if key != "step" and isinstance(value, (int, float))}
        for tracker in self.trackers:
            tracker.log(scalars, record["step"])
        return record

    def close(self, failed: bool = False) -> None:
        """Close metrics.jsonl and the trackers; a second call does nothing."""
        if self.handle is not None:
            self.handle.close()
        trackers, self.trackers = self.trackers, []
        close_trackers(trackers, failed)

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        """Trackers are closed after a failure too (a wandb run then ends marked failed)."""
        self.close(failed=kind is not None)


class Stopwatch:
    """`with clock("name"):` adds the block's wall time to clock.seconds["name"]. On a GPU it waits for the queued
    kernels at both ends, so each block is charged its own work and not the previous block's."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    @contextlib.contextmanager
    def __call__(self, name: str):
        self.sync()
        started = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started


def combine(parts: list[dict]) -> dict:
    """Merge micro-batch metrics: token-weighted means, max of maxima, sums of counts and losses."""
    tokens = sum(part["num_tokens"] for part in parts) or 1.0
    merged = {key: sum(part[key] * part["num_tokens"] for part in parts) / tokens for key in parts[0]}
    for key in merged:
        if key.endswith("_max"):
            merged[key] = max(part[key] for part in parts)
    merged["num_tokens"] = tokens
    merged["loss"] = sum(part["loss"] for part in parts)  # each part is already divided by the global count
    return merged
