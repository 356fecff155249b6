"""How far the expected step of each loss normalisation is from the true gradient, exactly.

Every response of a tiny Hugging Face student (vocabulary 5 with EOS, 1-3 new tokens) is enumerated through the
trainer's own `optimize` (tests/test_exact_end_to_end.py's helpers), batch of one. Printed per divergence and
gamma: the relative error of the default ("sequence-sum") and how far "token-mean" is from the gradient's
direction whatever its scale (sine of the angle), plain and centred, and stop-gradient OPD's error.

    python benchmarks/normalisation.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import report  # noqa: E402
from test_exact_end_to_end import expected_step, model, off_direction, relative_error, true_gradient  # noqa: E402

from opdplus.objective import Objective  # noqa: E402


def main() -> None:
    student, teacher = model(5, 0), model(5, 1)
    rows, worst_token_mean = {}, 0.0
    for divergence in ("rkl", "fkl", "jsd"):
        for gamma in (0.0, 1.0):
            truth = true_gradient(student, teacher, 5, 3, divergence, gamma)

            def step(**options):
                return expected_step(student, teacher, 5, 3, 1, Objective(divergence, gamma=gamma, **options))

            row = {"sequence_sum_rel_error": relative_error(step(), truth),
                   "token_mean_off_direction": off_direction(step(reduction="token-mean"), truth),
                   "token_mean_centred_off_direction": off_direction(step(reduction="token-mean", center=True), truth),
                   "opd_sequence_sum_rel_error": relative_error(step(estimator="opd"), truth)}
            worst_token_mean = max(worst_token_mean, row["token_mean_off_direction"])
            rows[f"{divergence}/gamma{gamma:g}"] = row
            print(f"{divergence:<4} gamma {gamma:g}: " + ", ".join(f"{k} {v:.2e}" for k, v in row.items()), flush=True)
    report("normalisation", worst_token_mean, "report", cases=rows,
           setup="tiny Llama student/teacher, vocabulary 5 with EOS, 1-3 new tokens, batch 1, exact enumeration")


if __name__ == "__main__":
    main()
