"""The `opdplus` command line. Each subcommand parses its flags and calls into the library."""

from __future__ import annotations

import argparse
import sys


def _exact(args: argparse.Namespace) -> None:
    """Exact check on an enumerable tabular student: how far each estimator's expected step is from the truth."""
    from opdplus.divergences import get_divergence
    from opdplus.tabular import TabularProblem, cosine, relative_error

    names = [get_divergence(name).name for name in args.divergences.split(",")]  # fail before printing
    problem = TabularProblem(vocab=args.vocab, length=args.length, seed=args.seed)
    print(f"tabular student: vocabulary {args.vocab}, length {args.length}, {len(problem.sequences)} sequences "
          f"enumerated exactly (float64), seed {args.seed}")
    print(f"{'divergence':<12} {'gamma':>5}  {'opd rel.err':>11} {'opd cos':>8}  {'opd+ rel.err':>12} {'opd+ cos':>8}")
    for name in names:
        for gamma in (0.0, 1.0):
            truth = problem.true_gradient(name, gamma)
            opd = problem.expected_descent_direction(name, "opd", gamma)
            plus = problem.expected_descent_direction(name, "opd+", gamma)
            print(f"{name:<12} {gamma:>5g}  {relative_error(opd, truth):>11.3g} {cosine(opd, truth):>8.3f}  "
                  f"{relative_error(plus, truth):>12.1e} {cosine(plus, truth):>8.3f}")
    print("rel.err = |E[estimate] - true gradient| / |true gradient|; cos < 0 means the step goes uphill.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opdplus", description="On-policy distillation with exact f-divergence advantages.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True)

    exact = commands.add_parser("exact", help="compare opd and opd+ with the exact gradient on a tabular student")
    exact.add_argument("--divergences", default="rkl,fkl,jsd,hellinger,chi2,alpha:0.5")
    exact.add_argument("--vocab", type=int, default=3)
    exact.add_argument("--length", type=int, default=3)
    exact.add_argument("--seed", type=int, default=0)
    exact.set_defaults(run=_exact)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, OSError) as error:
        if args.debug:
            raise
        print(f"opdplus {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
