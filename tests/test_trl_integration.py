"""OPDGRPOTrainer: TRL's GRPO loop trained on opdplus's per-token advantages against a teacher."""

import copy
import warnings

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from transformers import AutoModelForCausalLM, GenerationConfig, TrainerCallback

from opdplus import token_advantages
from opdplus.integrations.trl import (
    OPDGRPOTrainer,
    check_on_policy_schedule,
    opd_grpo_config,
    warn_if_not_exact_sampling,
)
from opdplus.logprobs import token_logprobs
from opdplus.teachers import get_teacher, score_sequences
from opdplus.tiny.tokenizer import build_char_tokenizer

PROMPTS = ["1+1=", "2+3=", "7*6=", "19-4="]


class SnapshotAtStepBegin(TrainerCallback):
    """Keeps the weights each optimizer step starts from: the policy that sampled that step's batch."""

    def __init__(self, model):
        self.model, self.weights = model, None

    def on_step_begin(self, args, state, control, **kwargs):
        self.weights = copy.deepcopy(self.model.state_dict())


def small_config(tmp_path, **overrides):
    values = {"output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 4, "num_generations": 2,
              "max_completion_length": 8, "max_steps": 2, "learning_rate": 1e-2, "activation_checkpointing": False,
              "report_to": "none", "save_strategy": "no", "logging_steps": 1, "seed": 0}
    values.update(overrides)
    return opd_grpo_config(**values)


def prompt_dataset():
    return datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": text}]} for text in PROMPTS])


def test_config_is_exact_on_policy(tmp_path):
    args = small_config(tmp_path)
    assert (args.temperature, args.top_k, args.top_p, args.repetition_penalty) == (1.0, 0, 1.0, 1.0)
    assert args.beta == 0.0 and args.loss_type == "dr_grpo" and args.num_iterations == 1 and not args.bf16
    with pytest.warns(UserWarning, match="not from the student"):
        small_config(tmp_path, temperature=0.7)


def test_opd_plus_refuses_stale_batches(tmp_path):
    with pytest.raises(ValueError, match="on-policy"):
        check_on_policy_schedule(small_config(tmp_path, num_iterations=2), "opd+")
    check_on_policy_schedule(small_config(tmp_path, num_iterations=2), "opd")  # the conventional reuse is allowed


def test_trainer_trains_on_token_advantages(models, tmp_path):
    student = AutoModelForCausalLM.from_pretrained(models["student"])
    initial = copy.deepcopy(student.state_dict())
    snapshot = SnapshotAtStepBegin(student)
    trainer = OPDGRPOTrainer(
        student, teacher=models["teacher"], divergence="fkl", estimator="opd+", gamma=0.5, log_ratio_clip=10.0,
        args=small_config(tmp_path), train_dataset=prompt_dataset(), processing_class=build_char_tokenizer(),
        callbacks=[snapshot],
    )
    # generate() applies no logits processor or warper: samples come from p_theta itself
    assert trainer.generation_config.top_k == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_not_exact_sampling(student, trainer.generation_config)
    trainer.train()

    assert any(not torch.equal(initial[name], value) for name, value in student.state_dict().items())
    batch = trainer.last_opd_batch
    advantages, mask, start = batch["advantages"], batch["mask"], batch["prompt_length"]
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    rows, width = input_ids.shape[0], input_ids.shape[1] - start
    assert rows == 4 and advantages.shape == mask.shape == (rows, width)
    assert torch.isfinite(advantages).all() and advantages[mask].abs().sum() > 0
    assert (advantages[~mask] == 0).all()
    assert torch.equal(mask, attention_mask[:, start:].bool())  # no tools: the loss mask is the completion mask

    # Recompute everything independently: the student as it was when it sampled this batch, a fresh teacher.
    sampler = AutoModelForCausalLM.from_pretrained(models["student"])
    sampler.load_state_dict(snapshot.weights)
    with torch.no_grad():
        student_lp = token_logprobs(sampler.eval(), input_ids, attention_mask, start=start)
    teacher = get_teacher(models["teacher"])
    sequences = [ids[keep].tolist() for ids, keep in zip(input_ids, attention_mask.bool())]
    starts = [int(keep[:start].sum()) for keep in attention_mask]
    teacher_lp = torch.zeros(rows, width)
    for row, scores in enumerate(score_sequences(teacher, sequences, starts)):
        teacher_lp[row, : len(scores)] = scores
    expected = token_advantages(student_lp, teacher_lp, mask, divergence="fkl", estimator="opd+", gamma=0.5,
                                log_ratio_clip=10.0)
    torch.testing.assert_close(batch["student_logprobs"][mask], student_lp[mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(batch["teacher_logprobs"][mask], teacher_lp[mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(advantages, expected, atol=1e-5, rtol=1e-5)


def test_model_generation_config_cannot_sneak_in_a_warper(models):
    student = AutoModelForCausalLM.from_pretrained(models["student"])
    student.generation_config.min_p = 0.1  # GRPOConfig leaves min_p unset, so a model's own value would apply
    config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0)
    with pytest.warns(UserWarning, match="MinPLogitsWarper"):
        warn_if_not_exact_sampling(student, config)


def test_reward_funcs_are_refused(models, tmp_path):
    with pytest.raises(ValueError, match="no reward_funcs"):
        OPDGRPOTrainer(models["student"], teacher=models["teacher"], divergence="rkl", args=small_config(tmp_path),
                       train_dataset=prompt_dataset(), reward_funcs=[lambda completions, **kw: [1.0]])
