"""Plain vs centred OPD+ weights (w vs w - w_f(1)): both exact, which has the lower per-step variance?

Exact, not sampled: every response of a tiny Hugging Face student (vocabulary 5 with EOS, 1-3 new tokens) is
enumerated through the trainer's own `optimize` (as tests/test_exact_end_to_end.py does), so the mean and the
variance of one step's gradient (batch of one; a batch of B divides the variance by B) are sums, not estimates.
Reported per divergence: trace of the step's covariance, plain / centred, and the relative error of each mean.

    python benchmarks/centering.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import report  # noqa: E402
from test_exact_end_to_end import model, relative_error, step_moments, true_gradient  # noqa: E402

from opdplus.objective import Objective, get_divergence  # noqa: E402


def main() -> None:
    student, teacher = model(5, 0), model(5, 1)
    rows, ratios = {}, []
    for name in ("rkl", "fkl", "jsd", "chi2", "hellinger"):
        shift = float(get_divergence(name).weight(torch.zeros((), dtype=torch.float64)))
        truth = true_gradient(student, teacher, 5, 3, name, 0.0)
        row = {"w_f(1)": shift}
        for label, center in (("plain", False), ("centred", True)):
            mean, second = step_moments(student, teacher, 5, 3, Objective(name, "opd+", center=center))
            row[f"{label}_variance"] = float(second - mean.pow(2).sum())
            row[f"{label}_rel_error"] = relative_error(mean, truth)
        row["variance_plain_over_centred"] = row["plain_variance"] / row["centred_variance"]
        if shift:
            ratios.append(row["variance_plain_over_centred"])
        rows[name] = row
        print(f"{name:<10} w_f(1) {shift:+.3f}  variance plain {row['plain_variance']:.4g}  centred "
              f"{row['centred_variance']:.4g}  plain/centred {row['variance_plain_over_centred']:.3f}  "
              f"(mean rel. error {row['plain_rel_error']:.1e} / {row['centred_rel_error']:.1e})", flush=True)
    report("centering", min(ratios), "report: plain / centred variance, smallest where w_f(1) != 0",
           divergences=rows, setup="tiny Llama student/teacher, vocabulary 5 with EOS, 1-3 new tokens, gamma 0, batch 1, exact")


if __name__ == "__main__":
    main()
