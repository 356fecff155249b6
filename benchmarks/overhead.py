"""Step time of opd+ over opd on the same batch and model: the trainer's update (student forward, loss,
backward, optimizer step) plus the teacher's scoring, alternating the two estimators so that drift in the
machine's speed hits both alike. Target: ratio <= 1.01.

    python benchmarks/overhead.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from common import report
from opdplus import Objective, token_advantages
from opdplus.logprobs import token_logprobs
from opdplus.parallel import SingleProcess
from opdplus.rollout import Rollouts
from opdplus.trainer import optimize


def model(seed: int, layers: int, hidden: int, vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
    return LlamaForCausalLM(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeats = 10 if args.quick else 30
    rows, prompt_length, response_length, vocab = 32, 32, 96, 8192
    student, teacher = model(0, 2, 128, vocab), model(1, 4, 256, vocab)
    teacher.requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (rows, prompt_length + response_length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    lengths = torch.randint(response_length // 2, response_length + 1, (rows,), generator=generator)
    mask = torch.arange(response_length)[None] < lengths[:, None]

    rollouts = Rollouts(input_ids=input_ids, attention_mask=attention_mask, prompt_length=prompt_length,
                        response_mask=mask, completions=[""] * rows, prompt_index=list(range(rows)))
    strategy = SingleProcess()
    strategy.wrap(student)
    times = {"opd": [], "opd+": []}
    for repeat in range(repeats + 2):  # the first two rounds warm up
        for estimator in (("opd", "opd+") if repeat % 2 == 0 else ("opd+", "opd")):
            objective = Objective("fkl", estimator, log_ratio_clip=10.0)
            optimizer = torch.optim.AdamW(student.parameters(), lr=1e-6)
            strategy.attach_optimizer(optimizer, 1.0)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
            started = time.perf_counter()
            with torch.no_grad():
                teacher_logprobs = token_logprobs(teacher, input_ids, attention_mask, start=prompt_length)
            optimize(strategy, optimizer, scheduler, objective, rollouts, teacher_logprobs)
            if repeat >= 2:
                times[estimator].append(time.perf_counter() - started)
    opd, plus = statistics.median(times["opd"]), statistics.median(times["opd+"])
    # the only code that differs: the advantage itself, timed alone on the same batch
    student_logprobs = -torch.rand(rows, response_length, generator=generator) * 3
    advantage_seconds = {}
    for estimator in ("opd", "opd+"):
        started = time.perf_counter()
        for _ in range(200):
            token_advantages(student_logprobs, teacher_logprobs, mask, divergence="fkl", estimator=estimator,
                             log_ratio_clip=10.0)
        advantage_seconds[estimator] = (time.perf_counter() - started) / 200
    report("overhead", plus / opd, "<= 1.01", repeats=repeats,
           batch=f"{rows} x ({prompt_length} + {response_length}) tokens", divergence="fkl",
           median_step_s_opd=round(opd, 4), median_step_s_opd_plus=round(plus, 4),
           min_step_s_opd=round(min(times["opd"]), 4), min_step_s_opd_plus=round(min(times["opd+"]), 4),
           advantage_ms_opd=round(1e3 * advantage_seconds["opd"], 4),
           advantage_ms_opd_plus=round(1e3 * advantage_seconds["opd+"], 4))


if __name__ == "__main__":
    main()
