"""End-to-end trainer runs on tiny random models: finite loss, weights change, determinism, resume."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from opdplus.cli import main
from opdplus.config import TrainConfig
from opdplus.tiny.tokenizer import build_char_tokenizer
from opdplus.trainer import NonFiniteRunError, train


def quick_config(models, out, **overrides):
    settings = dict(task="arith", student=models["student"], teacher=models["teacher"], out=str(out),
                    divergence="jsd", steps=4, prompts_per_step=4, samples_per_prompt=2, max_new_tokens=12,
                    eval_every=2, eval_examples=8, save_every=2, tensorboard=False, seed=3)
    settings.update(overrides)
    return TrainConfig(**settings)


def weights(path):
    return load_file(str(path / "model.safetensors"))


def metrics(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_training_changes_weights_and_logs_finite_metrics(models, tmp_path):
    train(quick_config(models, tmp_path / "run", ppo_epochs=2, clip_eps=0.2, micro_batch_size=3), progress=False)
    records = metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    for record in records[1:]:
        assert all(torch.isfinite(torch.tensor(record[key])) for key in ("loss", "reverse_kl", "advantage_abs_mean"))
        assert record["skipped_update"] == 0
    assert "greedy_accuracy" in records[2] and "greedy_accuracy" in records[4]
    start = load_file(str(models["student"]) + "/model.safetensors")
    final = weights(tmp_path / "run" / "final")
    assert any(not torch.equal(start[name], final[name]) for name in start)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "run" / "final")
    assert reloaded.config.vocab_size == len(build_char_tokenizer())
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


def test_same_seed_gives_identical_weights_and_resume_continues_exactly(models, tmp_path):
    train(quick_config(models, tmp_path / "a"), progress=False)
    train(quick_config(models, tmp_path / "b"), progress=False)
    a, b = weights(tmp_path / "a" / "final"), weights(tmp_path / "b" / "final")
    assert all(torch.equal(a[name], b[name]) for name in a)

    # a run that died right after its step-2 checkpoint: only that checkpoint and the log up to then survive
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-2", crashed / "checkpoint-2")
    lines = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    (crashed / "metrics.jsonl").write_text("\n".join(lines) + "\n")  # including steps past the checkpoint
    train(quick_config(models, crashed, resume=True), progress=False)
    resumed = metrics(crashed)
    assert [r["step"] for r in resumed] == [0, 1, 2, 3, 4]
    uninterrupted = metrics(tmp_path / "a")
    for key in ("loss", "reverse_kl", "sample_accuracy", "num_tokens"):
        assert resumed[3][key] == uninterrupted[3][key]
    c = weights(crashed / "final")
    assert all(torch.equal(a[name], c[name]) for name in a)


def test_output_directory_of_another_run_is_refused(models, tmp_path, capsys):
    train(quick_config(models, tmp_path / "run", steps=1, save_every=0), progress=False)
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    capsys.readouterr()
    code = main(["train", "--student", models["student"], "--teacher", models["teacher"], "--out",
                 str(tmp_path / "run"), "--steps", "1", "--no-progress"])
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "holds another run" in error and "--resume" in error
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize("flag,value,message", [
    ("--divergence", "kl", "unknown divergence"),
    ("--gamma", "1.5", "gamma must be in"),
    ("--lr", "0", "lr must be positive"),
    ("--estimator", "ppo", "estimator must be one of"),
    ("--prompts-per-step", "0", "prompts_per_step must be a positive integer"),
])
def test_bad_values_give_one_line_errors(models, tmp_path, capsys, flag, value, message):
    code = main(["train", "--student", models["student"], "--teacher", models["teacher"], "--out",
                 str(tmp_path / "run"), flag, value])
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and message in error
    assert not (tmp_path / "run").exists()


def test_non_finite_teacher_skips_updates_then_stops_cleanly(models, tmp_path):
    broken = tmp_path / "broken-teacher"
    teacher = LlamaForCausalLM.from_pretrained(models["teacher"])
    with torch.no_grad():
        teacher.model.norm.weight[0] = float("nan")  # every teacher log-prob becomes NaN
    teacher.save_pretrained(broken)
    build_char_tokenizer().save_pretrained(broken)
    config = quick_config(models, tmp_path / "run", teacher=str(broken), steps=6, save_every=1, max_bad_steps=2)
    with pytest.raises(NonFiniteRunError, match="2 consecutive steps"):
        train(config, progress=False)
    records = metrics(tmp_path / "run")
    assert [r["skipped_update"] for r in records[1:]] == [1, 1]
    assert records[1]["bad_rollouts"] == list(range(8))
    assert not (tmp_path / "run" / "final").exists()
    # the checkpoint written after the skipped step 1 holds the untouched initial weights
    start = load_file(str(models["student"]) + "/model.safetensors")
    saved = weights(tmp_path / "run" / "checkpoint-1")
    assert all(torch.equal(start[name], saved[name]) for name in start)


def test_gradient_checkpointing_gives_the_same_weights_and_bfloat16_trains(models, tmp_path):
    train(quick_config(models, tmp_path / "plain", steps=2, save_every=0, eval_every=0), progress=False)
    train(quick_config(models, tmp_path / "checkpointed", steps=2, save_every=0, eval_every=0,
                       gradient_checkpointing=True), progress=False)
    plain, checkpointed = weights(tmp_path / "plain" / "final"), weights(tmp_path / "checkpointed" / "final")
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], rtol=1e-5, atol=1e-6)
    train(quick_config(models, tmp_path / "bf16", steps=2, save_every=0, eval_every=0, dtype="bfloat16"),
          progress=False)
    records = metrics(tmp_path / "bf16")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records[1:])
    assert weights(tmp_path / "bf16" / "final")["model.norm.weight"].dtype == torch.bfloat16


def test_lora_trains_adapters_only_resumes_and_saves_a_merged_model(models, tmp_path):
    pytest.importorskip("peft")
    train(quick_config(models, tmp_path / "a", lora_r=4, save_every=2), progress=False)
    saved = tmp_path / "a" / "checkpoint-2"
    assert (saved / "adapter_model.safetensors").is_file() and not (saved / "model.safetensors").exists()
    final = weights(tmp_path / "a" / "final")
    start = load_file(str(models["student"]) + "/model.safetensors")
    assert set(final) == set(start)  # merged back into the plain architecture
    assert any(not torch.equal(start[name], final[name]) for name in start)
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    shutil.copytree(saved, crashed / "checkpoint-2")
    (crashed / "metrics.jsonl").write_text((tmp_path / "a" / "metrics.jsonl").read_text())
    train(quick_config(models, crashed, lora_r=4, resume=True), progress=False)
    resumed = weights(crashed / "final")
    assert all(torch.equal(final[name], resumed[name]) for name in final)
