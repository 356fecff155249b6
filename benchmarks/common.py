"""Shared benchmark plumbing: machine description, result file, the closing `ratio=` line."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        device = f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    return f"{platform.machine()} {device}, torch {torch.__version__}, Python {platform.python_version()}"


def report(script: str, ratio: float, target: str, **details) -> None:
    """Write benchmarks/results/<script>.json and print the result, ending with `ratio=<number>`."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"ratio": ratio, "target": target, "machine": machine(), **details}
    (RESULTS / f"{script}.json").write_text(json.dumps(result, indent=2) + "\n")
    for key, value in details.items():
        print(f"{key}: {value}")
    print(f"target: {target}")
    print(f"ratio={ratio:.4f}")
