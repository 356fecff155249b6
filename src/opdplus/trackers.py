"""Experiment trackers beside metrics.jsonl (`--report-to`, as in TRL): TensorBoard, Weights & Biases, Trackio.

Each tracker receives the numbers of every metrics.jsonl row with the row's `step`, on the main process only. The
libraries are imported only when named, so a run without them never pays their import time.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
from pathlib import Path

TRACKERS = ("tensorboard", "wandb", "trackio")
WANDB_ID_FILE = Path("wandb") / "opdplus-run-id"  # the wandb run a --resume continues


def tracker_names(report_to: str | list | tuple | None) -> list[str]:
    """`"tensorboard,wandb"`, `["wandb"]` or `"none"` as a list of tracker names; ValueError listing the valid
    ones on anything else."""
    if report_to is None:
        return []
    parts = report_to.split(",") if isinstance(report_to, str) else list(report_to)
    names = []
    for part in parts:
        name = part.strip().lower() if isinstance(part, str) else part
        if name == "":  # "wandb," or an empty value
            continue
        if name not in (*TRACKERS, "none"):
            raise ValueError(f"report_to: unknown tracker {part!r}; valid: {', '.join(TRACKERS)}, none")
        if name != "none" and name not in names:
            names.append(name)
    return names


def check_trackers_installed(names: list[str]) -> None:
    """Fail before anything is written when a named tracker's package is missing (TensorBoard ships with opdplus)."""
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise ValueError(f"report_to {name} needs the {name} package: pip install 'opdplus[{name}]'")


class TensorBoardTracker:
    """Event files in <out>/tensorboard; on resume the steps after the checkpoint are purged, as in metrics.jsonl."""

    def __init__(self, out: Path, keep_through: int, config: dict):
        from torch.utils.tensorboard import SummaryWriter  # imported lazily: it is slow to import

        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=keep_through + 1)

    def log(self, scalars: dict, step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def close(self, failed: bool) -> None:
        self.writer.close()


class WandbTracker:
    """A wandb run named after the run directory, its files under <out>/wandb (WANDB_MODE=offline works without
    network); its id is kept in the run directory so that --resume continues the same wandb run."""

    def __init__(self, out: Path, keep_through: int, config: dict):
        import wandb

        id_file = out / WANDB_ID_FILE
        resuming = keep_through >= 0 and id_file.is_file()
        run_id = id_file.read_text().strip() if resuming else secrets.token_hex(4)
        id_file.parent.mkdir(exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "opdplus"), name=out.resolve().name,
                              id=run_id, resume="allow" if resuming else None, dir=str(out), config=config)
        if not resuming:
            id_file.write_text(run_id + "\n")

    def log(self, scalars: dict, step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class TrackioTracker:
    """A Trackio run in project "opdplus" named after the run directory (stored where Trackio keeps its runs,
    TRACKIO_DIR); --resume continues it."""

    def __init__(self, out: Path, keep_through: int, config: dict):
        import trackio

        self.trackio = trackio
        trackio.init(project="opdplus", name=out.resolve().name, config=config,
                     resume="allow" if keep_through >= 0 else "never", embed=False)

    def log(self, scalars: dict, step: int) -> None:
        self.trackio.log(scalars, step=step)

    def close(self, failed: bool) -> None:
        self.trackio.finish()


TRACKER_CLASSES = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "trackio": TrackioTracker}


def start_trackers(names: list[str], out: Path, keep_through: int, config: dict) -> list:
    """The named trackers, started; if one fails to start, those already started are closed."""
    started = []
    try:
        for name in names:
            started.append(TRACKER_CLASSES[name](out, keep_through, config))
    except BaseException:
        close_trackers(started, failed=True)
        raise
    return started


def close_trackers(trackers: list, failed: bool) -> None:
    """Close every tracker, even when one of them fails to; the first failure is raised after."""
    error = None
    for tracker in trackers:
        try:
            tracker.close(failed)
        except Exception as caught:  # noqa: BLE001 - the others must still be closed
            error = error or caught
    if error is not None:
        raise error
