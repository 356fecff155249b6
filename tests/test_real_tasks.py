"""Real-task plumbing on tiny random Hugging Face models made here: a Qwen2 student and a Llama teacher sharing a
tokenizer whose chat template renders tools. One training step on GSM8K- and BFCL-format fixtures, `opdplus eval`
output, a teacher with another vocabulary, and several teachers routed per example."""

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from opdplus.cli import main
from opdplus.config import TrainConfig
from opdplus.rollout import render_prompt
from opdplus.tasks import get_task
from opdplus.teachers import LocalTeacher, TokenRows, score_sequences
from opdplus.teachers.routing import TeacherRouter
from opdplus.tiny import tiny_config
from opdplus.tiny.tokenizer import build_char_tokenizer
from opdplus.trainer import train

FIXTURES = Path(__file__).parent / "fixtures"
TOOLS_TEMPLATE = (
    "{% if tools %}<|user|>tools:{% for tool in tools %}{{ tool['name'] }};{% endfor %}{% endif %}"
    "{% for message in messages %}{% if message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}<|end|>"
    "{% else %}<|user|>{{ message['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def save(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def real_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = TOOLS_TEMPLATE
    torch.manual_seed(0)
    student = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                           max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                                           eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True))
    config = tiny_config(len(tokenizer), 1, 32, 4, max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    paths = {"student": save(student, tokenizer, root / "student")}
    for name, seed in (("teacher", 1), ("teacher2", 2)):
        torch.manual_seed(seed)
        paths[name] = save(LlamaForCausalLM(config), tokenizer, root / name)
    other = build_char_tokenizer()
    other.add_tokens(["<|extra|>"])  # one more token id the student could not have meant
    torch.manual_seed(3)
    paths["mismatch"] = save(LlamaForCausalLM(tiny_config(len(other), 1, 32, 4)), other, root / "mismatch")
    return paths


def run_one_step(real_models, tmp_path, **overrides):
    config = TrainConfig(student=real_models["student"], teacher=real_models["teacher"], out=str(tmp_path / "run"),
                         steps=1, prompts_per_step=2, samples_per_prompt=2, max_new_tokens=16, eval_every=1,
                         eval_examples=2, tensorboard=False, **overrides)
    train(config, progress=False)
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def test_one_math_step_on_gsm8k_format(real_models, tmp_path):
    data = str(FIXTURES / "gsm8k_mini.jsonl")
    records = run_one_step(real_models, tmp_path, task="math", data=data, test_data=data)
    assert records[1]["step"] == 1 and torch.isfinite(torch.tensor(records[1]["loss"]))
    assert "greedy_accuracy" in records[1]


def test_one_tooluse_step_on_bfcl_format_renders_tools_through_the_template(real_models, tmp_path):
    data = str(FIXTURES / "bfcl_mini.json")
    records = run_one_step(real_models, tmp_path, task="tooluse", data=data, test_data=data)
    assert torch.isfinite(torch.tensor(records[1]["loss"]))
    example = get_task("tooluse", test_data=data).examples("test", 1)[0]
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = TOOLS_TEMPLATE
    rendered = render_prompt(tokenizer, example)
    assert rendered.startswith("<|user|>tools:") and example.tools[0]["name"] in rendered


def test_eval_writes_a_table_and_per_example_jsonl(real_models, tmp_path, capsys):
    out = tmp_path / "eval.jsonl"
    code = main(["eval", "--model", real_models["student"], "--task", "math", "--data",
                 str(FIXTURES / "gsm8k_mini.jsonl"), "--max-new-tokens", "8", "--k", "2", "--out", str(out),
                 "--no-progress"])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len((FIXTURES / "gsm8k_mini.jsonl").read_text().splitlines())
    assert {"prompt", "output", "correct", "samples", "samples_correct"} <= rows[0].keys()
    printed = capsys.readouterr().out
    assert "greedy_accuracy" in printed and "pass@2" in printed


def test_a_teacher_with_another_vocabulary_trains_by_spans_after_one_notice(real_models, tmp_path, capsys):
    # one extra token id in the teacher's vocabulary: not the student's tokenizer, so the teacher re-tokenizes
    # (issue 17); the run says so in one line and trains
    code = main(["train", "--student", real_models["student"], "--teacher", real_models["mismatch"], "--out",
                 str(tmp_path / "run"), "--steps", "1", "--no-progress", "--prompts-per-step", "2",
                 "--samples-per-prompt", "2", "--max-new-tokens", "8", "--eval-every", "0", "--eval-examples", "2"])
    assert code == 0
    notices = [line for line in capsys.readouterr().out.splitlines() if "another tokenizer" in line]
    assert len(notices) == 1 and "span-level OPD+" in notices[0] and real_models["mismatch"] in notices[0]
    assert (tmp_path / "run" / "final").is_dir()


def test_router_scores_each_row_with_its_own_teacher(real_models):
    teachers = {name: LocalTeacher.load(real_models[name]) for name in ("teacher", "teacher2")}
    router = TeacherRouter({"default": teachers["teacher"], "b": teachers["teacher2"]})
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, 60, (4, 10), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0  # a left-padded prompt
    response_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    attention_mask[:, 6:] = response_mask.long()
    routes = [None, "b", "b", None]
    scores = router.score(TokenRows(input_ids, attention_mask, prompt_length=6), routes)
    for row, route in enumerate(routes):
        tokens = input_ids[row][attention_mask[row].bool()].tolist()
        start = len(tokens) - int(response_mask[row].sum())
        expected = score_sequences(teachers["teacher2" if route else "teacher"], [tokens], [start])[0]
        torch.testing.assert_close(scores[row, : len(expected)], expected)
    with pytest.raises(ValueError, match="not configured: c"):
        router.check_routes({None, "b", "c"})


def test_two_teacher_run_logs_metrics_per_teacher(real_models, tmp_path):
    teachers = {"arith": real_models["teacher"], "toolcall": real_models["teacher2"]}
    records = run_one_step(real_models, tmp_path, task="mix", teachers=teachers)
    step = records[1]
    shares = [step[f"teacher/{name}/token_share"] for name in teachers]
    assert abs(sum(shares) - 1.0) < 1e-6 and all(share > 0 for share in shares)
    assert all(step[f"teacher/{name}/divergence"] >= 0 for name in teachers)
    with pytest.raises(ValueError, match="not configured: toolcall"):
        run_one_step(real_models, tmp_path / "bad", task="mix", teachers={"arith": real_models["teacher"]})
