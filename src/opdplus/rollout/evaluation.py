"""Evaluation, in one place: greedy accuracy and avg@k during training (`evaluate`), and `opdplus eval`
(`evaluate_model`: also pass@k, with one JSONL line per example). Both decode through the HF engine, so a
task's tools are called in evaluation exactly as in training."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from opdplus.checkpoint import atomic_write_text
from opdplus.models import load_model_and_tokenizer
from opdplus.rollout.engine import make_engine
from opdplus.rollout.prompts import render_prompt
from opdplus.rollout.responses import eval_mode


@torch.no_grad()
def evaluate(model, tokenizer, task, examples, *, k: int = 0, batch_size: int = 256) -> dict:
    """Greedy accuracy, and avg@k (mean correctness of k temperature-1 samples per prompt) if k > 0."""
    greedy = make_engine("hf", model, tokenizer, task, greedy=True)  # greedy accuracy
    sampler = make_engine("hf", model, tokenizer, task)  # k temperature-1 samples per prompt
    with eval_mode(model):
        greedy_correct, sampled_correct = [], []
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            rollouts = greedy.generate(list(batch), num_samples=1, max_new_tokens=task.max_new_tokens)
            greedy_correct += [task.verify(c, batch[i]) for c, i in zip(rollouts.completions, rollouts.prompt_index)]
            if k > 0:
                # Chunk so that batch_size bounds the number of rows generated at once.
                per_chunk = max(1, batch_size // k)
                for chunk_start in range(0, len(batch), per_chunk):
                    chunk = batch[chunk_start : chunk_start + per_chunk]
                    rollouts = sampler.generate(list(chunk), num_samples=k, max_new_tokens=task.max_new_tokens)
                    sampled_correct += [task.verify(c, chunk[i]) for c, i in zip(rollouts.completions, rollouts.prompt_index)]
    return {
        "greedy_accuracy": sum(greedy_correct) / max(len(greedy_correct), 1),
        "avg_at_k": sum(sampled_correct) / len(sampled_correct) if k > 0 else None,
    }


@torch.no_grad()
def evaluate_model(model_spec: str, task, examples: list, *, k: int = 0, batch_size: int = 64,
                   out: Path | None = None, progress: bool = True) -> dict:
    """Greedy verdict per example (and k temperature-1 samples when k > 0); writes `out` as JSONL atomically."""
    model, tokenizer = load_model_and_tokenizer(model_spec)
    model.eval()
    greedy = make_engine("hf", model, tokenizer, task, greedy=True)  # greedy accuracy
    sampler = make_engine("hf", model, tokenizer, task)  # k temperature-1 samples per prompt
    rows = []
    for begin in tqdm(range(0, len(examples), batch_size), desc="eval", disable=not progress, dynamic_ncols=True):
        batch = examples[begin : begin + batch_size]
        decoded = greedy.generate(batch, num_samples=1, max_new_tokens=task.max_new_tokens)
        sampled = sampler.generate(batch, num_samples=k, max_new_tokens=task.max_new_tokens) if k else None
        for i, example in enumerate(batch):
            row = {"id": example.id} if example.id is not None else {}
            row.update({"prompt": render_prompt(tokenizer, example), "reference": _reference_answer(example),
                        "output": decoded.completions[i], "correct": task.verify(decoded.completions[i], example)})
            if decoded.transcripts is not None:  # multi-turn: every assistant turn and tool result
                row["transcript"] = decoded.transcripts[i]
            if sampled is not None:
                outputs = sampled.completions[i * k : (i + 1) * k]
                row["samples"] = outputs
                row["samples_correct"] = [task.verify(output, example) for output in outputs]
            rows.append(row)
    summary = {"examples": len(rows), "greedy_accuracy": sum(r["correct"] for r in rows) / max(1, len(rows))}
    if k:
        flags = [r["samples_correct"] for r in rows]
        summary.update({f"avg@{k}": avg_at_k(flags, k), f"pass@{k}": pass_at_k(flags, k)})
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return summary


def _reference_answer(example):
    """What a correct output must match: a BFCL record's ground truth (not its function schemas), else the
    task's reference as it is."""
    reference = example.reference
    if isinstance(reference, dict) and "ground_truth" in reference:
        return reference["ground_truth"]
    return reference


def pass_at_k(correct_flags_per_prompt: Sequence[Sequence[bool]], k: int) -> float:
    """Mean over prompts of the unbiased pass@k, 1 - C(n-c, k) / C(n, k) (Chen et al., 2021).

    Each prompt has n >= k sampled completions, c of them correct.
    """
    scores = []
    for flags in correct_flags_per_prompt:
        n, c = len(flags), sum(bool(flag) for flag in flags)
        if not 1 <= k <= n:
            raise ValueError(f"pass@{k} needs 1 <= k <= samples per prompt, got {n} samples")
        scores.append(1.0 - math.comb(n - c, k) / math.comb(n, k))
    return sum(scores) / len(scores) if scores else 0.0


def avg_at_k(correct_flags_per_prompt: Sequence[Sequence[bool]], k: int) -> float:
    """Mean accuracy over the first k completions of each prompt (avg@k, mean@k)."""
    scores = []
    for flags in correct_flags_per_prompt:
        if not 1 <= k <= len(flags):
            raise ValueError(f"avg@{k} needs 1 <= k <= samples per prompt, got {len(flags)} samples")
        scores.append(sum(bool(flag) for flag in flags[:k]) / k)
    return sum(scores) / len(scores) if scores else 0.0
