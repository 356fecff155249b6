"""Share of a training step spent outside generation, forward and backward passes: advantages, loss,
optimizer, verification, logging. Runs the real trainer on the built-in tiny arith models (no evaluation
during the measured steps) and reads the per-step timings it logs. Target: ratio <= 0.05.

    python benchmarks/breakdown.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from common import report
from opdplus.config import TrainConfig
from opdplus.demo import read_metrics
from opdplus.trainer import train

MODEL_PASSES = ("time_generate", "time_teacher", "time_student_forward", "time_backward")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    steps = 15 if args.quick else 60
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(task="arith", student="tiny:arith-student", teacher="tiny:arith-teacher", out=out,
                             divergence="jsd", steps=steps, eval_every=0, eval_examples=1, tensorboard=False,
                             prompts_per_step=16, samples_per_prompt=4)
        train(config, progress=False)
        records = [r for r in read_metrics(Path(out)) if r["step"] > 1]  # step 1 warms up
    step_seconds = sum(r["time_step"] for r in records)
    shares = {key: sum(r[key] for r in records) / step_seconds for key in MODEL_PASSES + ("time_optimizer",)}
    outside = 1.0 - sum(shares[key] for key in MODEL_PASSES)
    report("breakdown", outside, "<= 0.05", steps=len(records),
           median_step_s=round(statistics.median(r["time_step"] for r in records), 4),
           **{f"share_{key.removeprefix('time_')}": round(value, 4) for key, value in shares.items()})


if __name__ == "__main__":
    main()
