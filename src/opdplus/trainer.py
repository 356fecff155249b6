"""The OPD / OPD+ training loop, readable top to bottom.

    for each step:
        prompts  -> rollouts of the current student (exact on-policy sampling)       ids [N, P + T], mask [N, T]
        rollouts -> teacher log-probs of exactly the sampled token ids                [N, T]
        optimize -> ppo_epochs policy-gradient updates on the batch (micro-batched)
        sync the rollout engine, log, evaluate, checkpoint

N = prompts_per_step x samples_per_prompt rows on this process, P the left-padded prompt length, T the longest
response. Setup (loading, LoRA, sharding, resume) is in opdplus.run; how the student is spread over processes
is behind `run.strategy` (opdplus.parallel), so nothing below branches on DDP, FSDP or DeepSpeed.

Randomness is re-seeded from (seed, step) at the start of every step, so a resumed run draws exactly the
batches and samples the uninterrupted run would have drawn.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from opdplus.checkpoint import failpoint, release_run_directory, save_checkpoint
from opdplus.config import TrainConfig
from opdplus.metrics import Stopwatch, combine
from opdplus.objective import Objective
from opdplus.objective.spans import SpanScores, span_token_log_ratios
from opdplus.parallel import SingleProcess
from opdplus.rollout.evaluation import evaluate
from opdplus.run import Run, drop_long_prompts, save_final, setup_run


class NonFiniteRunError(RuntimeError):
    """Too many consecutive steps with NaN/inf: the run stops, checkpoints stay as they were."""


def train(config: TrainConfig, *, progress: bool = True) -> dict:
    """Run (or resume) one training run; returns the last logged metrics."""
    try:
        run = setup_run(config)
        with run.log:  # metrics.jsonl and the trackers are closed after a failure too
            return run_steps(run, progress)
    finally:  # the run directory is free for the next run (--resume, say), after a failure too
        release_run_directory(Path(config.out))


def run_steps(run: Run, progress: bool) -> dict:
    """The loop of `train`, from the run's first step to its last, then `final/`."""
    config, strategy, log = run.config, run.strategy, run.log
    last = log.write({"step": 0, **evaluate_student(run)}) if run.start_step == 0 else {"step": run.start_step}
    bad_steps = skipped_updates = long_prompts_skipped = 0
    bar = tqdm(range(run.start_step + 1, config.steps + 1), initial=run.start_step, total=config.steps,
               desc=f"{config.divergence}/{config.estimator}", disable=not (progress and strategy.is_main),
               dynamic_ncols=True)
    for step in bar:
        torch.manual_seed(config.seed * 1_000_003 + step + 7919 * strategy.rank)
        started, clock = time.perf_counter(), Stopwatch()

        with clock("generate"):  # 1. this process's share of the step's prompts, sampled by the current student
            examples, skipped = step_examples(run, step)
            with strategy.full_weights():
                rollouts = run.engine.generate(examples, num_samples=config.samples_per_prompt,
                                               max_new_tokens=run.max_new_tokens)  # ids [N, P + T]
        failpoint(f"rollout:{step}")
        mask = rollouts.response_mask  # [N, T] the sampled tokens through the first EOS

        with clock("teacher"):  # 2. each example's teacher scores exactly the sampled token ids
            routes = [examples[index].teacher or "default" for index in rollouts.prompt_index]
            prompts = [examples[index] for index in rollouts.prompt_index]  # a teacher may render its own prompt
            teacher_distribution = None  # dense / top-k: the teacher's next-token distribution at every position
            if run.objective.needs_distribution:
                teacher_logprobs, teacher_distribution = run.teachers.distribution(rollouts, routes,
                                                                                   run.objective.top_k, prompts)
            else:  # [N, T], or per aligned span (SpanScores) when a teacher has another tokenizer
                teacher_logprobs = run.teachers.score(rollouts, routes, prompts)
        correct = [run.task.verify(completion, examples[index])  # the outcome reward: 1 if correct, else 0
                   for completion, index in zip(rollouts.completions, rollouts.prompt_index)]

        with clock("update"):  # 3. policy-gradient updates; epochs after the first reuse the batch off-policy
            update = optimize(strategy, run.optimizer, run.scheduler, run.objective, rollouts, teacher_logprobs,
                              ppo_epochs=config.ppo_epochs, micro_batch_size=config.micro_batch_size,
                              gradient_checkpointing=config.gradient_checkpointing, clock=clock,
                              teacher_distribution=teacher_distribution,
                              sequence_advantages=run.objective.sequence_advantages(
                                  correct, rollouts.prompt_index, mask.device))
            if update.applied:
                run.engine.sync_weights(run.model)  # vLLM: the engine's copy of the weights; HF: nothing to do
        failpoint(f"update:{step}")

        bad_steps = 0 if update.applied else bad_steps + 1
        skipped_updates += not update.applied
        long_prompts_skipped += skipped
        if not update.applied:
            bad_prompts = sorted({rollouts.prompt_index[row] for row in update.bad_rows})
            tqdm.write(f"step {step}: non-finite values in {len(update.bad_rows)} rollouts "
                       f"(prompts {bad_prompts[:8]}); update skipped")
        record = {
            "step": step, **update.metrics,
            "skipped_update": int(not update.applied), "skipped_updates_total": skipped_updates,
            "long_prompts_skipped_total": long_prompts_skipped, "bad_rollouts": update.bad_rows,
            "sample_accuracy": sum(correct) / len(correct), "response_length": float(mask.sum(-1).float().mean()),
            "lr": run.scheduler.get_last_lr()[0],
            **{f"time_{name}": clock.seconds.pop(name) for name in ("generate", "teacher", "update")},
            **{f"time_{name}": seconds for name, seconds in clock.seconds.items()},  # forward, backward, optimizer
        }
        if isinstance(teacher_logprobs, SpanScores):  # a re-tokenizing teacher: how coarse its spans are
            record["tokens_per_span"] = float(mask.sum() / teacher_logprobs.span_mask.sum().clamp(min=1))
        if config.reward_weight:  # the outcome reward mixed into the advantages (a verifier's: 1 correct, 0 not)
            record["reward_mean"] = sum(map(float, correct)) / len(correct)
        if config.teachers and update.applied:  # several teachers: each one's share, divergence and |A|
            record.update({f"teacher/{key}": value for key, value in run.objective.group_metrics(
                routes, mask, update.log_ratios, update.advantages).items()})
        if run.evaluates and config.eval_every and (step % config.eval_every == 0 or step == config.steps):
            record.update(evaluate_student(run))
        record["time_step"] = time.perf_counter() - started
        last = log.write(record)
        if bad_steps >= config.max_bad_steps:
            raise NonFiniteRunError(f"{bad_steps} consecutive steps with non-finite values (last at step {step}); "
                                    f"stopped, the last good checkpoint in {run.out} is intact")
        bar.set_postfix(acc=f"{log.last_accuracy:.2f}", rkl=f"{record.get('reverse_kl', math.nan):.3f}",
                        s_step=f"{record['time_step']:.2f}")

        if config.save_every and step % config.save_every == 0:
            weights, optimizer_state = strategy.checkpoint_state()  # every process takes part
            if strategy.is_main:
                save_checkpoint(run.out, step, run.model, run.tokenizer, optimizer_state, run.scheduler,
                                {"config": config.to_dict()}, config.keep_last, weights=weights)

    log.close()
    run.teachers.close()
    steps_run = config.steps - run.start_step
    if steps_run > 0 and skipped_updates == steps_run:  # the "trained" student would be the untouched one
        raise NonFiniteRunError(f"no update was applied in {steps_run} steps (non-finite values in every step); "
                                f"final/ not written in {run.out}: check the teacher and --divergence/--lr")
    save_final(run)
    return last


def step_examples(run: Run, step: int) -> tuple[list, int]:
    """This process's share of the step's prompts (drawn from (seed, step), so a resumed run draws the same),
    without those over max_prompt_length; and how many were dropped."""
    config, strategy = run.config, run.strategy
    examples = run.task.examples("train", config.prompts_per_step * strategy.world_size,
                                 seed=config.seed * 1_000_003 + step)
    share = examples[strategy.rank * config.prompts_per_step : (strategy.rank + 1) * config.prompts_per_step]
    return drop_long_prompts(share, run.tokenizer, config)


def evaluate_student(run: Run) -> dict:
    """Held-out greedy accuracy (and avg@k), by process 0; every process enters (FSDP gathers the weights)."""
    with run.strategy.full_weights():
        return evaluate(run.model, run.tokenizer, run.task, run.test_examples, k=run.config.eval_k) \
            if run.test_examples else {}


@dataclass
class Update:
    metrics: dict  # the first (on-policy) epoch's, token-weighted over micro-batches, plus grad_norm
    bad_rows: list[int]  # rows with non-finite log-probs, loss or gradients; when not empty nothing was applied
    logprobs: torch.Tensor  # [N, T] the sampling policy's log-probs (the first epoch's, detached)
    advantages: torch.Tensor  # [N, T] the first epoch's advantages
    log_ratios: torch.Tensor  # [N, T] teacher - student, the first epoch's (spans: at each span's last token)

    @property
    def applied(self) -> bool:
        return not self.bad_rows


def optimize(strategy: SingleProcess, optimizer, scheduler, objective: Objective, rollouts,
             teacher_logprobs: torch.Tensor | SpanScores, *, ppo_epochs: int = 1, micro_batch_size: int | None = None,
             gradient_checkpointing: bool = False, clock: Stopwatch | None = None, teacher_distribution=None,
             sequence_advantages: torch.Tensor | None = None) -> Update:
    """`ppo_epochs` optimizer steps on one batch, each accumulated over micro-batches of `micro_batch_size` rows.

    The loss of every micro-batch is divided by a count of the whole step (all micro-batches, all processes):
    its number of sequences by default, which does not depend on what was sampled (so the expected step is the
    true gradient), or its token count (`objective.reduction == "token-mean"`). Neither micro-batching nor the
    number of processes changes the gradient. The first epoch is
    on-policy; later ones use importance ratios against its log-probs (OPD+'s weight stays the exact weight of
    the current policy). When another engine sampled the batch (`rollouts.sampling_logprobs`, e.g. vLLM), every
    token's term is weighted by min(p_theta / p_engine, cap), computed once from the first epoch's log-probs, so
    the update stays that of the policy being trained. A non-finite value anywhere skips the whole update on
    every process. teacher_distribution (dense / top-k estimators): the teacher's next-token distribution at every
    response position, rows as the rollouts'; sequence_advantages [N]: the outcome reward's share of each row's
    advantage (`Objective.sequence_advantages`). teacher_logprobs: [N, T], or a re-tokenizing teacher's scores per
    aligned span (`SpanScores`): the advantages are then span-level, everything else is the same."""
    clock = clock or Stopwatch()
    input_ids, attention_mask = rollouts.input_ids, rollouts.attention_mask  # [N, P + T]
    mask, prompt_length = rollouts.response_mask, rollouts.prompt_length  # [N, T], P
    engine_logprobs = rollouts.sampling_logprobs  # [N, T], or None when the trained model sampled itself
    rows = input_ids.shape[0]
    micro_batches = [slice(begin, begin + (micro_batch_size or rows)) for begin in range(0, rows, micro_batch_size or rows)]
    num_sequences = int(strategy.all_reduce(torch.tensor(float(rows), dtype=torch.float64)))
    num_tokens = int(strategy.all_reduce(mask.sum().double()).clamp(min=1))
    empty_passes = strategy.passes_to_match(len(micro_batches))  # sharded: other processes may have more
    spans = teacher_logprobs if isinstance(teacher_logprobs, SpanScores) else None
    teacher_finite = _teacher_finite(teacher_logprobs, mask)  # [N, T]
    dtype = (teacher_logprobs if spans is None else spans.logprobs).dtype  # float64 in the exactness tests
    behavior_logprobs = torch.zeros(mask.shape, dtype=dtype, device=mask.device)  # [N, T]
    advantages = torch.zeros_like(behavior_logprobs)  # [N, T]
    sample_weights = torch.ones_like(behavior_logprobs)  # [N, T] p_theta / p_engine, truncated (1: no engine)
    first_metrics: dict = {}
    with strategy.training(gradient_checkpointing):
        for epoch in range(ppo_epochs):
            parts, bad_rows = [], []
            for batch in micro_batches:
                divergences = None  # [B, T] dense / top-k: each position's divergence, with gradient
                with clock("student_forward"):
                    if teacher_distribution is None:
                        logprobs = strategy.logprobs(input_ids[batch], attention_mask[batch], prompt_length)  # [B, T]
                    else:
                        both = strategy.logprobs(input_ids[batch], attention_mask[batch], prompt_length,
                                                 objective.per_position(teacher_distribution.rows(batch)))  # [B, T, 2]
                        logprobs, divergences = both[..., 0], both[..., 1]
                finite = (torch.isfinite(logprobs.detach()) & teacher_finite[batch]) | ~mask[batch]
                if divergences is not None:
                    finite &= torch.isfinite(divergences.detach()) | ~mask[batch]
                if not finite.all():
                    bad_rows += [batch.start + row for row in (~finite.all(-1)).nonzero().flatten().tolist()]
                    strategy.discard(logprobs.sum())
                    continue
                correction = {}
                if engine_logprobs is not None and epoch == 0:
                    sample_weights[batch], correction = objective.sampler_weights(logprobs, engine_logprobs[batch],
                                                                                  mask[batch])
                loss, metrics, batch_advantages = objective.loss(
                    logprobs, teacher_logprobs[batch] if spans is None else spans.rows(batch), mask[batch],
                    num_sequences=num_sequences, num_tokens=num_tokens,
                    behavior_logprobs=behavior_logprobs[batch] if epoch > 0 else None,
                    sample_weights=sample_weights[batch] if engine_logprobs is not None else None,
                    divergences=divergences,
                    sequence_advantages=sequence_advantages[batch] if sequence_advantages is not None else None)
                if not torch.isfinite(loss):  # e.g. an unclipped fkl/chi2 weight overflowing
                    bad_rows += list(range(batch.start, min(batch.stop, rows)))
                    strategy.discard(loss)
                    continue
                if epoch == 0:
                    behavior_logprobs[batch], advantages[batch] = logprobs.detach(), batch_advantages
                with clock("backward"):
                    strategy.backward(loss)
                parts.append({**metrics, **correction})
            strategy.run_empty_passes(empty_passes, input_ids, attention_mask, prompt_length)
            with clock("optimizer"):
                applied, grad_norm = strategy.step(bad=bool(bad_rows))  # gradients summed over processes
            if parts and epoch == 0:
                first_metrics = {**combine(parts), "grad_norm": grad_norm}
            if not applied:
                return Update(first_metrics, bad_rows or list(range(rows)), behavior_logprobs, advantages,
                              _log_ratios(teacher_logprobs, behavior_logprobs, mask))
            scheduler.step()
    return Update(first_metrics, [], behavior_logprobs, advantages,
                  _log_ratios(teacher_logprobs, behavior_logprobs, mask))


def _teacher_finite(teacher_logprobs: torch.Tensor | SpanScores, mask: torch.Tensor) -> torch.Tensor:
    """[N, T] True where the teacher's score of the token (or of the span it belongs to) is finite."""
    if not isinstance(teacher_logprobs, SpanScores):
        return torch.isfinite(teacher_logprobs)
    span_finite = torch.isfinite(teacher_logprobs.logprobs) | ~teacher_logprobs.span_mask  # [N, K]
    return span_finite.gather(1, torch.where(mask, teacher_logprobs.span_ids, 0))


def _log_ratios(teacher_logprobs: torch.Tensor | SpanScores, logprobs: torch.Tensor, mask: torch.Tensor):
    """[N, T] teacher - student log-probs (spans: each span's at its last token), 0 off the mask (and where a
    skipped update left non-finite scores: these are for the metrics)."""
    if isinstance(teacher_logprobs, SpanScores):
        finite = replace(teacher_logprobs, logprobs=torch.nan_to_num(teacher_logprobs.logprobs, 0.0, 0.0, 0.0))
        return span_token_log_ratios(finite, logprobs, mask)
    return torch.where(mask, torch.nan_to_num(teacher_logprobs - logprobs, 0.0, 0.0, 0.0), 0.0)
