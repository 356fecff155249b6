"""How far is top-k's coarsened divergence from the whole one, on the built-in tiny models?

Rollouts are sampled from tiny:arith-student on arith prompts and scored by tiny:arith-teacher through
`LocalTeacher.distribution` (the trainer's path). At every response position, D is the divergence over the whole
vocabulary (101 tokens) and D_K the one over the teacher's K likeliest tokens plus one tail bucket, which is at
most D (data-processing inequality). Reported per divergence and K: the mean over positions of D_K / D and the
ratio of the summed divergences (both from the models' logits in float64, positions with D > 1e-9), and the cosine
between the student's gradients of the topk:K and the dense loss (gamma = 0, through the trainer's chunked head,
`head_logprobs_and_per_position`, in float32).

    python benchmarks/topk_gap.py [--prompts 64] [--seed 0]
"""

from __future__ import annotations

import argparse

import torch

from common import report
from opdplus.logprobs import head_logits, head_logprobs_and_per_position, predicting_states
from opdplus.models import load_model_and_tokenizer
from opdplus.objective import Objective, get_divergence
from opdplus.objective.dense import position_divergences
from opdplus.rollout.hf import sample
from opdplus.tasks import get_task
from opdplus.teachers.local import LocalTeacher

DIVERGENCES, TOP_KS = ("rkl", "fkl", "jsd"), (1, 8, 64)


def loss_gradient(student, rollouts, scores, distribution, objective) -> torch.Tensor:
    """The flattened gradient of the trainer's loss for `objective` on these rollouts."""
    start, mask = rollouts.prompt_length, rollouts.response_mask
    student.zero_grad()
    hidden = predicting_states(student, rollouts.input_ids, rollouts.attention_mask, start=start)
    both = head_logprobs_and_per_position(student, hidden, rollouts.input_ids[:, start:],
                                          objective.per_position(distribution))
    loss, _, _ = objective.loss(both[..., 0], scores, mask, num_sequences=len(mask), num_tokens=float(mask.sum()),
                                divergences=both[..., 1])
    loss.backward()
    gradient = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
    return gradient


@torch.no_grad()
def float64_log_probs(student, rollouts, dense) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) next-token log-probs [tokens, V] at the response positions, from float32 logits in float64."""
    start, mask = rollouts.prompt_length, rollouts.response_mask
    hidden = predicting_states(student, rollouts.input_ids, rollouts.attention_mask, start=start)[mask]
    student_logprobs = torch.log_softmax(head_logits(student)(hidden).double(), -1)
    return student_logprobs, torch.log_softmax(dense.logits_of(dense.states[mask]).double(), -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64, help="arith prompts, one sampled response each")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    student, tokenizer = load_model_and_tokenizer("tiny:arith-student")
    teacher = LocalTeacher.load("tiny:arith-teacher")
    task = get_task("arith")
    with torch.no_grad():
        rollouts = sample(student, tokenizer, task.examples("train", args.prompts, seed=args.seed),
                          max_new_tokens=task.max_new_tokens)
    scores, dense = teacher.distribution(rollouts)
    tops = {k: teacher.distribution(rollouts, top_k=k)[1] for k in TOP_KS}
    tokens = int(rollouts.response_mask.sum())
    print(f"{args.prompts} rollouts of tiny:arith-student, {tokens} response tokens, scored by tiny:arith-teacher "
          f"(vocabulary {student.config.vocab_size}); gamma 0")
    print(f"{'divergence':<10} {'K':>3} {'mean D_K/D':>10} {'max D_K/D':>9} {'sum D_K/sum D':>13} {'cos(grad)':>9}")
    student_logprobs, teacher_logprobs = float64_log_probs(student, rollouts, dense)
    rows = {}
    for name in DIVERGENCES:
        divergence = get_divergence(name)
        full = position_divergences(divergence, student_logprobs, teacher_logprobs)
        kept = full > 1e-9  # below, the ratio is rounding noise
        full_gradient = loss_gradient(student, rollouts, scores, dense, Objective(name, "dense"))
        for k in TOP_KS:
            gradient = loss_gradient(student, rollouts, scores, tops[k], Objective(name, f"topk:{k}"))
            top = teacher_logprobs.topk(k, -1)
            coarse = position_divergences(divergence, student_logprobs, top.values, top.indices)
            ratio = coarse[kept] / full[kept]
            row = {"mean_ratio": float(ratio.mean()), "sum_ratio": float(coarse[kept].sum() / full[kept].sum()),
                   "gradient_cosine": float(torch.nn.functional.cosine_similarity(gradient, full_gradient, dim=0)),
                   "max_ratio": float(ratio.max()), "positions": int(kept.sum())}
            rows[f"{name} topk:{k}"] = row
            print(f"{name:<10} {k:>3} {row['mean_ratio']:>10.3f} {row['max_ratio']:>9.6f} {row['sum_ratio']:>13.3f} "
                  f"{row['gradient_cosine']:>9.3f}", flush=True)
    report("topk_gap", min(row["mean_ratio"] for row in rows.values()), "report: mean D_K / D (<= 1), smallest",
           rows=rows, setup=f"tiny:arith-student rollouts ({args.prompts} prompts, seed {args.seed}, {tokens} "
                            f"tokens) scored by tiny:arith-teacher; gamma 0")


if __name__ == "__main__":
    main()
