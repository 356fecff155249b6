"""On-policy distillation inside TRL's `GRPOTrainer`: teacher-scored per-token advantages replace GRPO's rewards.

    trainer = OPDGRPOTrainer(model, teacher="tiny:arith-teacher", divergence="rkl",
                             args=opd_grpo_config(output_dir="out"), train_dataset=dataset)
    trainer.train()

GRPO generates the completions as usual. `_generate_and_score_completions` then scores the exact prompt +
completion token ids (no re-tokenisation) with the teacher and the student, calls `opdplus.token_advantages`
and hands GRPO a [B, T] `advantages` tensor, which its loss accepts as it is (it only adds a token axis to
1-D advantages). Nothing is group-normalised or whitened.

GRPO insists on a reward source, so the trainer passes one reward function, `zero_reward`, that returns 0 for
every completion: the group-normalised advantages GRPO derives from it are all 0 and are then replaced. The
logged `reward` metrics are therefore always 0; the `opd/*` metrics describe the distillation.

What `opd_grpo_config` sets, and why:
- temperature 1, top_k 0, top_p 1, repetition_penalty 1 (and `disable_dropout`): samples from p_theta itself;
  anything else would make the estimates those of another distribution. `top_k=0` matters: transformers
  fills an unset top_k with 50. The trainer also warns if `generate` would still apply a logits processor
  (for example one a model's own generation_config adds).
- beta 0: no KL-to-reference term; the teacher is the only target.
- loss_type "dr_grpo": the sum of per-token losses divided by a constant (sequences x max_completion_length),
  so, like opdplus's default "sequence-sum", the divisor does not depend on the sampled lengths and the
  expected step is the gradient (docs/theory.md, "Normalisation"). "dapo" (the global token count, opdplus's
  "token-mean") and "bnpo" (each micro-batch's tokens) divide by a random count, which biases the step when
  lengths vary; "grpo" first averages within each sequence.
- num_iterations 1 (with steps_per_generation = gradient_accumulation_steps, TRL's default): every batch is
  trained on by the policy that sampled it. "opd+" needs advantages at the current policy, which TRL's reuse
  of a batch over several updates cannot give, so the trainer refuses it for "opd+".
- bf16 off: OPD compares student and teacher log-probs token by token, and bf16 moves them by ~0.1 nats.
  On CPU, `use_cpu=True` also.

The student's log-probs of the completion tokens are always computed here, with `opdplus.logprobs` (positions
from the attention mask, as `generate` uses them), because TRL skips `old_per_token_logps` when
num_iterations is 1. This costs one extra forward pass per generation batch.

Untested here: TRL's vLLM generation (`use_vllm=True`) and multi-process training.
"""

from __future__ import annotations

import warnings

import torch

try:
    from trl import GRPOConfig, GRPOTrainer
except ImportError as error:  # the extra is optional; say which one to install
    raise ImportError("opdplus.integrations.trl needs TRL: install opdplus[trl]") from error

from opdplus.objective.advantages import check_estimator, check_gamma, check_log_ratio_clip, token_advantages
from opdplus.objective.divergences import Divergence, get_divergence
from opdplus.logprobs import token_logprobs
from opdplus.rollout import eval_mode
from opdplus.teachers import Teacher, TokenRows, get_teacher

# Sampling values under which `generate` samples from the model's own distribution.
EXACT_SAMPLING = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0}
TOKEN_LEVEL_LOSSES = ("dapo", "bnpo", "dr_grpo")


def opd_grpo_config(**overrides) -> GRPOConfig:
    """A `GRPOConfig` set up for exact on-policy distillation (see the module docstring); any field can be
    overridden. Sampling values other than exact ones are accepted with a warning."""
    values = {
        **EXACT_SAMPLING,
        "min_p": None,
        "beta": 0.0,
        "loss_type": "dr_grpo",
        "num_iterations": 1,
        "scale_rewards": "none",  # the (all-zero) GRPO rewards need no scaling
        "disable_dropout": True,
        "bf16": False,
        "use_cpu": not torch.cuda.is_available(),
    }
    values.update(overrides)
    changed = {name: values[name] for name in EXACT_SAMPLING if values[name] != EXACT_SAMPLING[name]}
    if values["min_p"]:
        changed["min_p"] = values["min_p"]
    if changed:
        warnings.warn(f"sampling with {changed}: samples are then not from the student's own distribution, so "
                      "on-policy distillation estimates are biased", stacklevel=2)
    return GRPOConfig(**values)


def zero_reward(completions, **kwargs) -> list[float]:
    """GRPO needs a reward function; OPD's signal is the teacher's, so this one gives 0 to every completion."""
    return [0.0] * len(completions)


class OPDGRPOTrainer(GRPOTrainer):
    """`GRPOTrainer` whose advantages are opdplus's per-token OPD / OPD+ advantages against a teacher.

    Args:
        model, args, train_dataset, processing_class, ...: as for `GRPOTrainer` (`args` defaults to
            `opd_grpo_config()`); `reward_funcs` is not accepted, the teacher is the reward.
        teacher: a `Teacher`, or a spec for `opdplus.teachers.get_teacher` (a directory, a `tiny:` name, a Hub
            id, or an http(s) URL of a served teacher).
        divergence, estimator, gamma, log_ratio_clip, center: as for `opdplus.token_advantages`.

    After each generation batch, `last_opd_batch` holds its input_ids, attention_mask, prompt_length and the
    [B, T] student_logprobs, teacher_logprobs, mask and advantages (before TRL shuffles and splits the batch).
    """

    def __init__(self, model, teacher: str | Teacher, *, divergence: str | Divergence, estimator: str = "opd+",
                 gamma: float = 0.0, log_ratio_clip: float | None = 10.0, center: bool = False,
                 args: GRPOConfig | None = None, **grpo_kwargs):
        if "reward_funcs" in grpo_kwargs:
            raise ValueError("OPDGRPOTrainer takes no reward_funcs: the teacher's per-token advantages replace "
                             "GRPO's rewards")
        self.opd_divergence = get_divergence(divergence)
        self.opd_estimator = check_estimator(estimator)
        self.opd_gamma = check_gamma(gamma)
        self.opd_log_ratio_clip = check_log_ratio_clip(log_ratio_clip)
        self.opd_center = center
        self.teacher = get_teacher(teacher) if isinstance(teacher, str) else teacher
        args = args if args is not None else opd_grpo_config()
        check_on_policy_schedule(args, estimator)
        super().__init__(model, reward_funcs=[zero_reward], args=args, **grpo_kwargs)
        self.teacher.check_tokenizer(self._tokenizer)  # the teacher must read the student's ids as meant
        if not self.use_vllm:
            warn_if_not_exact_sampling(self.accelerator.unwrap_model(self.model), self.generation_config)
        if self.beta != 0.0:
            warnings.warn(f"beta={self.beta}: a KL-to-reference term is added to the distillation loss", stacklevel=2)
        if self.loss_type not in TOKEN_LEVEL_LOSSES:
            warnings.warn(f"loss_type={self.loss_type!r} is not a token-level loss: tokens are weighted by their "
                          "sequence's length; opd_grpo_config uses 'dr_grpo'", stacklevel=2)
        self.last_opd_batch: dict | None = None

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        prompt_ids, prompt_mask = output["prompt_ids"], output["prompt_mask"]
        completion_ids, completion_mask = output["completion_ids"], output["completion_mask"]
        # tool / environment tokens stay in the context but get no advantage
        mask = completion_mask if "tool_mask" not in output else completion_mask * output["tool_mask"]
        mask = mask.bool()
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        prompt_length = prompt_ids.shape[1]

        student = self._student_logprobs(input_ids, attention_mask, prompt_length)
        teacher = self._teacher_logprobs(prompt_ids, prompt_mask, completion_ids, completion_mask).to(student.device)
        advantages = token_advantages(
            student, teacher, mask, divergence=self.opd_divergence, estimator=self.opd_estimator,
            gamma=self.opd_gamma, log_ratio_clip=self.opd_log_ratio_clip, center=self.opd_center,
        )
        output["advantages"] = advantages  # [B, T]: GRPO's loss uses it per token
        self.last_opd_batch = {
            "input_ids": input_ids, "attention_mask": attention_mask, "prompt_length": prompt_length,
            "student_logprobs": student, "teacher_logprobs": teacher, "mask": mask, "advantages": advantages,
        }
        self._log_opd_metrics(student, teacher, mask, advantages)
        return output

    @torch.no_grad()
    def _student_logprobs(self, input_ids, attention_mask, prompt_length: int) -> torch.Tensor:
        model = self.accelerator.unwrap_model(self.model)
        with eval_mode(model):
            return token_logprobs(model, input_ids, attention_mask, start=prompt_length)

    def _teacher_logprobs(self, prompt_ids, prompt_mask, completion_ids, completion_mask) -> torch.Tensor:
        """[B, T] teacher log-probs of the completion tokens; 0 on padding. TRL lays a batch out as rollouts
        are (prompts left-padded, completions right-padded), so the teacher scores it as it is."""
        return self.teacher.score(TokenRows(torch.cat([prompt_ids, completion_ids], 1),
                                            torch.cat([prompt_mask, completion_mask], 1), prompt_ids.shape[1]))

    def _log_opd_metrics(self, student, teacher, mask, advantages) -> None:
        mode = "train" if self.model.training else "eval"
        count = mask.sum().clamp(min=1)
        reverse_kl = (torch.where(mask, student - teacher, 0.0).sum() / count).item()
        self._metrics[mode]["opd/reverse_kl"].append(reverse_kl)
        self._metrics[mode]["opd/advantage_abs_mean"].append((advantages.abs().sum() / count).item())


def check_on_policy_schedule(args: GRPOConfig, estimator: str) -> None:
    """Refuse "opd+" when TRL would train on a batch after the policy that sampled it has been updated.

    TRL regenerates every steps_per_generation * num_iterations micro-steps; the policy changes every
    gradient_accumulation_steps micro-steps. "opd+" needs advantages at the current policy, which TRL's fixed
    per-batch advantages cannot give once the policy moved.
    """
    generate_every = args.steps_per_generation * args.num_iterations
    if estimator == "opd+" and args.gradient_accumulation_steps % generate_every != 0:
        raise ValueError(
            f"estimator 'opd+' needs on-policy batches, but num_iterations={args.num_iterations} and "
            f"steps_per_generation={args.steps_per_generation} with gradient_accumulation_steps="
            f"{args.gradient_accumulation_steps} reuse a batch after an optimizer step; use num_iterations=1 "
            "and leave steps_per_generation unset, or estimator='opd'"
        )


def warn_if_not_exact_sampling(model, generation_config) -> None:
    """Warn if `generate` with this config (merged with the model's own generation_config, as generate merges
    them) would apply any logits processor or warper: samples would then not be from p_theta."""
    try:  # private transformers API: skip the check rather than fail if it changes
        effective, _ = model._prepare_generation_config(generation_config)
        processors = model._get_logits_processor(effective, input_ids_seq_length=1, device="cpu")
    except (AttributeError, TypeError, ValueError):
        return
    if len(processors):
        names = ", ".join(type(processor).__name__ for processor in processors)
        warnings.warn(f"generate would apply {names}: samples are then not from the student's own distribution, "
                      "so on-policy distillation estimates are biased", stacklevel=3)
