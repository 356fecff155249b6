"""`opdplus eval`: greedy accuracy, avg@k and pass@k of a model on a task, with one JSONL line per example."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from opdplus.checkpoint import atomic_write_text
from opdplus.rollout import render_prompt
from opdplus.tasks.math import avg_at_k, pass_at_k
from opdplus.tiny.models import load_model_and_tokenizer
from opdplus.toolloop import sample_for_task


@torch.no_grad()
def evaluate_model(model_spec: str, task, examples: list, *, k: int = 0, batch_size: int = 64,
                   out: Path | None = None, progress: bool = True) -> dict:
    """Greedy verdict per example (and k temperature-1 samples when k > 0); writes `out` as JSONL atomically."""
    model, tokenizer = load_model_and_tokenizer(model_spec)
    model.eval()
    rows = []
    for begin in tqdm(range(0, len(examples), batch_size), desc="eval", disable=not progress, dynamic_ncols=True):
        batch = examples[begin : begin + batch_size]
        greedy = sample_for_task(model, tokenizer, task, batch, max_new_tokens=task.max_new_tokens, greedy=True)
        sampled = (sample_for_task(model, tokenizer, task, batch, num_samples=k, max_new_tokens=task.max_new_tokens)
                   if k else None)
        for i, example in enumerate(batch):
            row = {"prompt": render_prompt(tokenizer, example), "output": greedy.completions[i],
                   "correct": task.verify(greedy.completions[i], example)}
            if greedy.transcripts is not None:  # multi-turn: every assistant turn and tool result
                row["transcript"] = greedy.transcripts[i]
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
