"""Scoring one training batch with a vLLM-served teacher versus the same teacher in process: median time over
repeats (alternating the two, so drift in the machine's speed hits both alike), and the bytes the served
teacher sends back per scored token. ratio = served time / in-process time, in process taking the faster
of torch's default threads and 1 thread (on a busy shared machine 2 threads can be many times slower than 1).
No target: "report". Also the bytes per scored token of the top-k estimator's requests (`--estimator topk:K`:
`prompt_logprobs: K`) for K in TOP_KS, beside K = 0 (plain scoring).

    python benchmarks/served_teacher.py [--quick] [--vllm-python PATH]   (or env OPDPLUS_VLLM_PYTHON)

Starts and stops its own vLLM server (CPU build, own venv: .ci/vllm-env.sh). On a CPU-only machine the server
and this process share the cores; on a real setup the server has its own accelerator.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import report
from transformers import LlamaForCausalLM
from vllm_server import VLLMServer

from opdplus.teachers import get_teacher
from opdplus.teachers.sequences import from_sequences
from opdplus.tiny import ASSETS_DIR, build_char_tokenizer, tiny_config

TOP_KS = (8, 64)  # the server is started with --max-logprobs 64 (vLLM's default allows 20)


def teacher_directory(workdir: str) -> tuple[str, str]:
    """The packaged tiny arith teacher when it is built, else a random tiny Llama of the same kind."""
    packaged = ASSETS_DIR / "arith-teacher"
    if (packaged / "config.json").is_file():
        return str(packaged), "tiny:arith-teacher"
    tokenizer = build_char_tokenizer()
    torch.manual_seed(1)
    config = tiny_config(len(tokenizer), 2, 128, 2, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    path = Path(workdir) / "teacher"
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path), "random tiny Llama (2 layers, hidden 128; tiny:arith-teacher not built)"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--vllm-python", default=os.environ.get("OPDPLUS_VLLM_PYTHON"))
    args = parser.parse_args()
    if not args.vllm_python:
        sys.exit("needs the vLLM venv's python: --vllm-python PATH or OPDPLUS_VLLM_PYTHON (see .ci/vllm-env.sh)")
    repeats = 5 if args.quick else 20
    rows, prompt_length, response_length = 64, 12, 28  # one batch of ~40-token arith-sized rollouts

    with tempfile.TemporaryDirectory() as workdir:
        model_dir, teacher_name = teacher_directory(workdir)
        local = get_teacher(model_dir, batch_size=rows)
        max_model_len = min(256, local.model.config.max_position_embeddings)
        rng = random.Random(0)
        vocab = len(local.tokenizer)
        sequences = [[rng.randrange(vocab) for _ in range(prompt_length + rng.randint(response_length // 2, response_length))]
                     for _ in range(rows)]
        starts = [prompt_length] * rows  # the teacher scores the response tokens
        scored_tokens = sum(len(ids) - begin for ids, begin in zip(sequences, starts))
        batch = from_sequences(sequences, starts)  # laid out as the trainer's rollouts are

        server = VLLMServer(model_dir, python=args.vllm_python, max_model_len=max_model_len,
                            log_path=str(Path(workdir) / "server.log"),
                            extra_args=("--max-logprobs", str(max(TOP_KS))))
        try:
            server.start(timeout=300)
            served = get_teacher(server.url)  # defaults: batches of 16, 4 concurrent requests
            one_request = get_teacher(server.url, batch_size=rows, concurrency=1)
            default_threads = torch.get_num_threads()
            # in process at torch's default threads and at 1 thread: on a busy shared machine 2 threads can
            # be far slower than 1 (oversubscription), and the fair comparison is with the faster setting
            scorers = {"served": (served, default_threads), "served_one_request": (one_request, default_threads),
                       "local": (local, default_threads), "local_1_thread": (local, 1)}
            times = {key: [] for key in scorers}
            for repeat in range(repeats + 1):  # round 0 warms up
                order = list(scorers) if repeat % 2 == 0 else list(reversed(scorers))
                for key in order:
                    teacher, threads = scorers[key]
                    torch.set_num_threads(threads)
                    bytes_before = served.client.bytes_received
                    began = time.perf_counter()
                    scores = teacher.score(batch)  # [rows, response_length]
                    elapsed = time.perf_counter() - began
                    if repeat:
                        times[key].append(elapsed)
                    if key == "served":
                        bytes_per_batch = served.client.bytes_received - bytes_before
                        served_scores = scores
                    elif key == "local":
                        local_scores = scores
            torch.set_num_threads(default_threads)
            top_k_bytes = {}  # K -> bytes received for the batch: the answer grows with K at every position
            for k in TOP_KS:
                bytes_before = served.client.bytes_received
                served.distribution(batch, top_k=k)
                top_k_bytes[k] = served.client.bytes_received - bytes_before
        finally:
            server.stop()

    difference = (served_scores - local_scores).abs().max().item()
    median = {key: statistics.median(values) for key, values in times.items()}
    best_local = min(median["local"], median["local_1_thread"])
    report("served_teacher", median["served"] / best_local, "report",
           teacher=teacher_name, repeats=repeats,
           batch=f"{rows} sequences of {prompt_length} + {response_length // 2}..{response_length} tokens",
           scored_tokens=scored_tokens, server_startup_s=round(server.startup_seconds, 1),
           median_s_local=round(median["local"], 4), local_default_threads=default_threads,
           median_s_local_1_thread=round(median["local_1_thread"], 4),
           median_s_served=round(median["served"], 4),
           median_s_served_one_request=round(median["served_one_request"], 4),
           ratio_served_one_request=round(median["served_one_request"] / best_local, 3),
           bytes_received_per_batch=bytes_per_batch,
           bytes_per_scored_token=round(bytes_per_batch / scored_tokens, 1),
           **{f"bytes_per_scored_token_top{k}": round(top_k_bytes[k] / scored_tokens, 1) for k in TOP_KS},
           max_abs_logprob_difference=f"{difference:.2e}")


if __name__ == "__main__":
    main()
