"""Peak memory of chunked log-probs over naive full-logits log-probs, student path (forward + backward),
vocabulary 151,936 and 4,096 tokens. Each variant runs in a fresh process; peak RSS growth over the
process's RSS just before the log-prob call is what is compared. Target: ratio <= 0.10.

Also one whole training forward + backward (teacher scoring, student log-probs, loss, backward; jsd) of the
sampled OPD+ estimator and of the dense one, which needs the teacher's and the student's full next-token
distributions at every position: both must stay far below the 2.5 GB of one [1, 4096, 151936] float32 tensor.

    python benchmarks/memory.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

VOCAB, TOKENS = 151_936, 4_096


def measure(variant: str, tokens: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from opdplus.logprobs import position_ids_from_mask, token_logprobs

    torch.manual_seed(0)
    if variant in ("sampled", "dense"):
        return measure_training_step(variant, tokens)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=tokens + 8,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    input_ids = torch.randint(0, VOCAB, (1, tokens + 1))
    attention_mask = torch.ones_like(input_ids)
    baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if variant == "chunked":
        logprobs = token_logprobs(model, input_ids, attention_mask, start=1)
    else:  # what most OPD code does: full [batch, length, vocab] float32 logits, log_softmax, gather
        logits = model(input_ids, attention_mask=attention_mask,
                       position_ids=position_ids_from_mask(attention_mask)).logits[:, :-1].float()
        logprobs = torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    logprobs.sum().backward()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": variant, "extra_peak_mib": (peak_kib - baseline_kib) / 1024}


def tiny_llama(tokens: int, seed: int):
    """Random-weight Llama with the benchmark's vocabulary and hidden size 64."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4,
                                        max_position_embeddings=tokens + 8, tie_word_embeddings=True))


def measure_training_step(variant: str, tokens: int) -> dict:
    """One training forward + backward as the trainer does it: a one-token prompt and `tokens` response tokens."""
    import torch

    from opdplus.logprobs import head_logits, head_logprobs, head_logprobs_and_per_position, predicting_states
    from opdplus.objective import Objective
    from opdplus.teachers.distribution import DenseDistribution

    student, teacher = tiny_llama(tokens, 0), tiny_llama(tokens, 1)
    input_ids = torch.randint(0, VOCAB, (1, tokens + 1))
    attention_mask = torch.ones_like(input_ids)
    targets, mask = input_ids[:, 1:], torch.ones(1, tokens, dtype=torch.bool)
    objective = Objective("jsd", "dense" if variant == "dense" else "opd+")
    baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():  # the local teacher: its last states, and the scores of the sampled tokens
        teacher_states = predicting_states(teacher, input_ids, attention_mask, start=1)
        teacher_scores = head_logprobs(teacher, teacher_states, targets)
    hidden = predicting_states(student, input_ids, attention_mask, start=1)
    if variant == "dense":
        distribution = DenseDistribution(teacher_states, head_logits(teacher))
        both = head_logprobs_and_per_position(student, hidden, targets, objective.per_position(distribution))
        logprobs, divergences = both[..., 0], both[..., 1]
    else:
        logprobs, divergences = head_logprobs(student, hidden, targets), None
    loss, _, _ = objective.loss(logprobs, teacher_scores, mask, num_sequences=1, num_tokens=tokens,
                                divergences=divergences)
    loss.backward()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": variant, "extra_peak_mib": (peak_kib - baseline_kib) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="same sizes (they are the target); kept for symmetry")
    parser.add_argument("--variant", choices=["chunked", "naive", "sampled", "dense"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, TOKENS)))
        return
    from common import report

    results = {}
    for variant in ("naive", "chunked", "sampled", "dense"):
        output = subprocess.run([sys.executable, __file__, "--variant", variant], capture_output=True, text=True,
                                check=True).stdout
        results[variant] = json.loads(output.strip().splitlines()[-1])["extra_peak_mib"]
    report("memory", results["chunked"] / results["naive"], "<= 0.10",
           vocab=VOCAB, tokens=TOKENS, naive_extra_peak_mib=round(results["naive"], 1),
           chunked_extra_peak_mib=round(results["chunked"], 1),
           training_step_sampled_opd_plus_extra_peak_mib=round(results["sampled"], 1),
           training_step_dense_extra_peak_mib=round(results["dense"], 1),
           one_full_logits_tensor_mib=round(TOKENS * VOCAB * 4 / 2**20, 1))


if __name__ == "__main__":
    main()
