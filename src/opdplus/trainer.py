"""The OPD / OPD+ training loop, readable top to bottom.

    for each step:
        prompts  -> student rollouts (HF generate, KV cache, exact on-policy sampling)
        tokens   -> teacher log-probs of exactly the sampled ids (no re-tokenisation)
        tokens   -> student log-probs (with gradient)
        opd_loss -> backward -> clip -> optimizer step        (ppo_epochs times on the same batch)
        log, evaluate, checkpoint

Under `accelerate launch` each process samples and scores its share of the step's prompts; the update is the
one a single process would make on the whole batch (DDP or FSDP2: opdplus.distributed).

Randomness is re-seeded from (seed, step) at the start of every step, so a resumed run draws exactly the
batches and samples the uninterrupted run would have drawn.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from opdplus.backends import get_backend
from opdplus.checkpoint import (
    atomic_directory,
    atomic_write_text,
    check_run_directory,
    checkpoints,
    failpoint,
    load_training_state,
    prepare_run_directory,
    save_checkpoint,
)
from opdplus.config import TrainConfig
from opdplus.distributed import (
    PolicyScorer,
    all_reduce,
    all_reduce_gradients,
    broadcast_from_first_process,
    checkpoint_state,
    deepspeed_backward,
    deepspeed_engine,
    deepspeed_step,
    describe_shards,
    full_weights,
    gathered_weights,
    is_deepspeed,
    is_sharded,
    launch_sharding,
    load_optimizer_state,
    shard,
    world,
    zero_stage,
)
from opdplus.advantages import token_advantages
from opdplus.divergences import get_divergence
from opdplus.losses import opd_loss
from opdplus.rollout import encode_prompts, evaluate
from opdplus.tasks import DATA_TASKS
from opdplus.teachers import get_teacher
from opdplus.teachers.routing import TeacherRouter
from opdplus.tiny.models import load_model_and_tokenizer
from opdplus.toolloop import sample_for_task


class NonFiniteRunError(RuntimeError):
    """Too many consecutive steps with NaN/inf: the run stops, checkpoints stay as they were."""


def train(config: TrainConfig, *, progress: bool = True) -> dict:
    """Run (or resume) one training run; returns the last logged metrics."""
    config.validate()
    sharding = launch_sharding()  # "fsdp" or "deepspeed" under such a launch config, else None
    if sharding and config.rollout_backend != "hf":
        raise ValueError(f"--rollout-backend {config.rollout_backend} under {sharding} is not supported: use ddp.yaml")
    if sharding == "deepspeed" and (config.lora_r or config.dtype != "float32"):
        raise ValueError(f"{'--lora-r' if config.lora_r else '--dtype ' + config.dtype} under DeepSpeed is not "
                         "supported yet (float32, all weights): use configs/accelerate/fsdp.yaml or ddp.yaml")
    out = Path(config.out)
    check_run_directory(out, resume=config.resume, overwrite=config.overwrite)
    task = config.make_task()
    device, dtype = config.resolved_device(), getattr(torch, config.dtype)
    student, tokenizer = load_model_and_tokenizer(config.student, dtype=dtype)
    teachers = TeacherRouter({name: get_teacher(spec, **options)
                              for name, (spec, options) in config.teacher_specs().items()})
    teachers.check_tokenizer(tokenizer)  # every token id the student emits must mean the same to each teacher
    evaluates = config.task not in DATA_TASKS or config.test_data is not None
    if not evaluates:
        warnings.warn("no --test-data: held-out evaluation is skipped", stacklevel=2)
    test_examples = task.examples("test", config.eval_examples, seed=0) if evaluates else []
    teachers.check_routes({example.teacher for example in task.examples("train", 256, seed=config.seed)})
    if config.max_prompt_length:  # too-long prompts fail (or leave nothing to train on) before anything is written
        candidates = task.load("train") if hasattr(task, "load") else task.examples("train", 256, seed=config.seed)
        drop_long_prompts(candidates, tokenizer, config)
    rank, world_size = world()
    main_process = rank == 0  # under `accelerate launch`: only process 0 writes, evaluates and logs
    if main_process:
        prepare_run_directory(out, overwrite=config.overwrite)

    resume_from = checkpoints(out)[-1][1] if config.resume and checkpoints(out) else None
    if resume_from is not None and sharding == "deepspeed" and zero_stage() == 3:
        raise ValueError(f"--resume under DeepSpeed ZeRO-3 is not supported yet: resume {out} with "
                         "configs/accelerate/fsdp.yaml, deepspeed-zero2.yaml or ddp.yaml (checkpoints are the same)")
    if config.resume and resume_from is None and main_process:
        warnings.warn(f"--resume: no checkpoint in {out}, starting from step 0", stacklevel=2)
    if resume_from is not None and not config.lora_r:  # weights through safetensors, exactly as saved
        student = AutoModelForCausalLM.from_pretrained(resume_from, dtype=dtype, use_safetensors=True)
    if config.lora_r:
        student = with_lora(student, config, resume_from)
    student.to(device)
    for module in student.modules():  # sampling, scoring and training must see one and the same policy
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if config.gradient_checkpointing:  # HF models checkpoint only in train mode, hence no dropout above
        # renamed in transformers 5.x (the old name warns)
        getattr(student, "activation_checkpointing_enable", student.gradient_checkpointing_enable)()
    student.eval()
    broadcast_from_first_process(student)
    policy = shard(student) if sharding == "fsdp" else student  # what the loss runs through; FSDP: the sharded student

    trainable = [parameter for parameter in student.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    if sharding == "deepspeed":  # the engine partitions the optimizer's state (ZeRO-3: the weights too)
        policy = deepspeed_engine(student, optimizer, config.max_grad_norm)
    if sharding and main_process:
        tqdm.write(describe_shards(policy))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    start_step = 0
    if resume_from:
        start_step = load_training_state(resume_from, scheduler,
                                          lambda state: load_optimizer_state(policy, student, optimizer, state))["step"]
    if main_process:
        atomic_write_text(out / "config.json", json.dumps(config.to_dict(), indent=2))
    log = MetricsLog(out, keep_through=start_step if resume_from else -1, tensorboard=config.tensorboard,
                     enabled=main_process)

    max_new_tokens = config.max_new_tokens or task.max_new_tokens
    last = {"step": start_step}
    test_examples = test_examples if main_process else []
    if start_step == 0:
        with full_weights(policy):  # every process enters: FSDP gathers the weights; process 0 evaluates
            last = log.write({"step": 0, **(evaluate(student, tokenizer, task, test_examples, k=config.eval_k)
                                            if test_examples else {})})

    bad_steps, skipped_steps, long_prompts_skipped = 0, 0, 0
    backend = None if config.rollout_backend == "hf" else get_backend(config.rollout_backend, student, tokenizer)
    bar = tqdm(range(start_step + 1, config.steps + 1), initial=start_step, total=config.steps,
               desc=f"{config.divergence}/{config.estimator}", disable=not (progress and main_process),
               dynamic_ncols=True)
    for step in bar:
        torch.manual_seed(config.seed * 1_000_003 + step + 7919 * rank)
        started = time.perf_counter()

        # 1. rollouts from the current student, on this process's share of the step's prompts
        examples = task.examples("train", config.prompts_per_step * world_size, seed=config.seed * 1_000_003 + step)
        examples = examples[rank * config.prompts_per_step : (rank + 1) * config.prompts_per_step]
        examples, skipped = drop_long_prompts(examples, tokenizer, config)
        long_prompts_skipped += skipped
        if backend is None:
            with full_weights(policy):
                rollouts = sample_for_task(student, tokenizer, task, examples,
                                           num_samples=config.samples_per_prompt, max_new_tokens=max_new_tokens,
                                           temperature=config.temperature, top_k=config.top_k, top_p=config.top_p)
        else:  # an inference engine with its own copy of the weights, synced after every update
            rollouts = backend.generate(examples, num_samples=config.samples_per_prompt, max_new_tokens=max_new_tokens)
        failpoint(f"rollout:{step}")
        input_ids, attention_mask = rollouts.input_ids, rollouts.attention_mask  # [N, P + T]
        mask, prompt_length = rollouts.response_mask, rollouts.prompt_length  # [N, T], P
        generated = time.perf_counter()

        # 2. each example's teacher scores exactly the sampled token ids
        routes = [examples[index].teacher for index in rollouts.prompt_index]
        teacher_logprobs = teachers.score(input_ids, attention_mask, mask, routes)  # [N, T]
        scored = time.perf_counter()

        # 3. policy-gradient updates; later epochs reuse the batch with importance ratios
        metrics, bad_rows, sampled_logprobs = update(policy, optimizer, scheduler, config, input_ids,
                                                     attention_mask, prompt_length, mask, teacher_logprobs,
                                                     timings := {})
        if backend is not None and not bad_rows:
            backend.sync_weights(student)
        updated = time.perf_counter()
        failpoint(f"update:{step}")
        bad_steps = bad_steps + 1 if bad_rows else 0
        skipped_steps += bool(bad_rows)
        if bad_rows:
            bad_samples = sorted({rollouts.prompt_index[row] for row in bad_rows})
            tqdm.write(f"step {step}: non-finite values in {len(bad_rows)} rollouts (prompts {bad_samples[:8]}); "
                       f"update skipped")

        correct = [task.verify(completion, examples[index])
                   for completion, index in zip(rollouts.completions, rollouts.prompt_index)]
        record = {
            "step": step,
            **metrics,
            "skipped_update": int(bool(bad_rows)),
            "skipped_updates_total": skipped_steps,
            "long_prompts_skipped_total": long_prompts_skipped,
            "bad_rollouts": bad_rows,
            "sample_accuracy": sum(correct) / len(correct),
            "response_length": float(mask.sum(-1).float().mean()),
            "lr": scheduler.get_last_lr()[0],
            "time_generate": generated - started,
            "time_teacher": scored - generated,
            "time_update": updated - scored,
            **{f"time_{name}": seconds for name, seconds in timings.items()},
        }
        if config.teachers and not bad_rows:
            record.update(per_teacher_metrics(config, routes, mask, sampled_logprobs, teacher_logprobs))
        if evaluates and config.eval_every and (step % config.eval_every == 0 or step == config.steps):
            with full_weights(policy):
                record.update(evaluate(student, tokenizer, task, test_examples, k=config.eval_k)
                              if test_examples else {})
        record["time_step"] = time.perf_counter() - started
        last = log.write(record)
        if bad_steps >= config.max_bad_steps:
            log.close()
            raise NonFiniteRunError(f"{bad_steps} consecutive steps with non-finite values (last at step {step}); "
                                    f"stopped, the last good checkpoint in {out} is intact")
        bar.set_postfix(acc=f"{log.last_accuracy:.2f}", rkl=f"{record.get('reverse_kl', math.nan):.3f}",
                        s_step=f"{record['time_step']:.2f}")

        if config.save_every and step % config.save_every == 0:
            weights, optimizer_state = checkpoint_state(policy, student, optimizer)  # every process takes part
            if main_process:
                save_checkpoint(out, step, student, tokenizer, optimizer_state, scheduler,
                                {"config": config.to_dict()}, config.keep_last, weights=weights)

    log.close()
    teachers.close()
    weights = gathered_weights(policy, student)  # every process takes part; None unless sharded
    if main_process:  # a plain Hugging Face model directory; LoRA adapters are merged into the weights
        if sharding and config.lora_r:  # merging needs whole matrices: an unsharded copy takes the gathered weights
            student = with_lora(load_model_and_tokenizer(config.student, dtype=dtype)[0], config, None)
            student.load_state_dict(weights)
            weights = None
        final_model = student.merge_and_unload() if config.lora_r else student
        atomic_directory(out / "final", lambda d: (final_model.save_pretrained(d, safe_serialization=True,
                                                                               state_dict=weights),
                                                  tokenizer.save_pretrained(d)))
    return last


def with_lora(student, config: TrainConfig, resume_from: Path | None):
    """Wrap the student with LoRA adapters on every linear layer (fresh, or the checkpoint's when resuming);
    only the adapters train. Checkpoints then hold the adapters, `final/` the merged model."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if resume_from is not None:
        return PeftModel.from_pretrained(student, resume_from, is_trainable=True)
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0, target_modules="all-linear")
    with torch.random.fork_rng():  # the adapters' random initialisation follows the run's seed
        torch.manual_seed(config.seed)
        return get_peft_model(student, lora)


def drop_long_prompts(examples: list, tokenizer, config: TrainConfig) -> tuple[list, int]:
    """Examples whose rendered prompt fits max_prompt_length, and how many were dropped; with
    long_prompts="fail" a too-long prompt is an error instead."""
    if not config.max_prompt_length:
        return examples, 0
    kept = []
    for example, ids in zip(examples, encode_prompts(tokenizer, examples)):
        length = len(ids)
        if length <= config.max_prompt_length:
            kept.append(example)
        elif config.long_prompts == "fail":
            raise ValueError(f"a prompt of {length} tokens exceeds max_prompt_length={config.max_prompt_length} "
                             f"(starts {example.prompt[:40]!r}); raise the limit or pass --long-prompts skip")
    if not kept:
        raise ValueError(f"every prompt of the batch exceeds max_prompt_length={config.max_prompt_length}")
    return kept, len(examples) - len(kept)


def update(student, optimizer, scheduler, config: TrainConfig, input_ids, attention_mask, prompt_length, mask,
           teacher_logprobs, timings: dict | None = None) -> tuple[dict, list[int], torch.Tensor]:
    """ppo_epochs optimizer steps on one batch of `student` (the causal LM, or a PolicyScorer around it, which
    FSDP shards). Returns the first (on-policy) epoch's metrics, the rows
    that held non-finite log-probs, loss or gradients (when not empty, no update was applied) and the
    sampling policy's log-probs [N, T].
    Seconds spent in the student's forward, backward and optimizer steps are added to `timings`."""
    timings = {} if timings is None else timings
    clock = Stopwatch(timings)
    student.train(config.gradient_checkpointing)  # dropout is off: train mode only switches checkpointing on
    try:
        return _update(student, optimizer, scheduler, config, input_ids, attention_mask, prompt_length, mask,
                       teacher_logprobs, clock)
    finally:
        student.eval()


def _update(student, optimizer, scheduler, config, input_ids, attention_mask, prompt_length, mask,
            teacher_logprobs, clock) -> tuple[dict, list[int], torch.Tensor]:
    rows = input_ids.shape[0]
    micro = config.micro_batch_size or rows
    policy = student if isinstance(student, PolicyScorer) or is_deepspeed(student) else PolicyScorer(student)
    deepspeed = is_deepspeed(policy)

    def backward(loss, bad=False):  # DeepSpeed: through the engine, gradients summed over processes
        deepspeed_backward(policy, loss, bad=bad) if deepspeed else (loss.mul(0) if bad else loss).backward()
    # the token count of the whole step, over micro-batches and processes: neither changes the gradient
    num_tokens = int(all_reduce(mask.sum().double()).clamp(min=1))
    begins: list[int | None] = list(range(0, rows, micro))
    if is_sharded(policy):  # FSDP's forward and backward are collectives: every process runs as many of them
        begins += [None] * (int(all_reduce(torch.tensor(len(begins)), op="max")) - len(begins))
    behavior_logprobs = torch.zeros_like(teacher_logprobs)
    first_metrics: dict = {}
    for epoch in range(config.ppo_epochs):
        parts, bad_rows = [], []
        for begin in begins:
            if begin is None:  # a pass that adds nothing, to take part in the other processes' collectives
                backward(policy(input_ids[:1], attention_mask[:1], prompt_length).sum().mul(0))
                continue
            batch = slice(begin, begin + micro)
            with clock("student_forward"):
                logprobs = policy(input_ids[batch], attention_mask[batch], prompt_length)
            finite = (torch.isfinite(logprobs.detach()) & torch.isfinite(teacher_logprobs[batch])) | ~mask[batch]
            if not finite.all():
                bad_rows += [begin + row for row in (~finite.all(-1)).nonzero().flatten().tolist()]
                if is_sharded(policy):  # the update is skipped anyway; the collectives must still match
                    backward(logprobs.sum(), bad=True)
                continue
            loss, metrics = opd_loss(
                logprobs, teacher_logprobs[batch], mask[batch], divergence=config.divergence,
                estimator=config.estimator, gamma=config.gamma, log_ratio_clip=config.log_ratio_clip,
                behavior_logprobs=behavior_logprobs[batch] if epoch > 0 else None,
                clip_eps=config.clip_eps, num_tokens=num_tokens, center=config.center_weight,
            )
            if not torch.isfinite(loss):  # e.g. an unclipped fkl/chi2 weight overflowing
                bad_rows += list(range(begin, min(begin + micro, rows)))
                if is_sharded(policy):
                    backward(loss, bad=True)
                continue
            if epoch == 0:
                behavior_logprobs[batch] = logprobs.detach()
            with clock("backward"):
                backward(loss)
            parts.append(metrics)
        # data parallel: sum the gradients (each process's loss is already divided by the global token
        # count) and skip the update everywhere if any process saw non-finite values
        bad_anywhere = all_reduce_gradients(policy, bad=bool(bad_rows))
        if deepspeed:  # DeepSpeed clips and steps, and skips the step when a gradient is not finite
            with clock("optimizer"):
                applied, grad_norm = deepspeed_step(policy)
            if parts and epoch == 0:
                first_metrics = {**combine(parts), "grad_norm": grad_norm}
            if not applied:
                return first_metrics, bad_rows or list(range(rows)), behavior_logprobs
            scheduler.step()
            continue
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), config.max_grad_norm or math.inf)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor
        if parts and epoch == 0:
            first_metrics = {**combine(parts), "grad_norm": float(grad_norm)}
        if bad_anywhere or not torch.isfinite(grad_norm):  # never apply a NaN/inf update
            optimizer.zero_grad(set_to_none=True)
            return first_metrics, bad_rows or list(range(rows)), behavior_logprobs
        with clock("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
    return first_metrics, [], behavior_logprobs


def per_teacher_metrics(config: TrainConfig, routes: list, mask, student_logprobs, teacher_logprobs) -> dict:
    """Share of tokens, mean per-token divergence and mean |A| of each teacher's rows."""
    advantages = token_advantages(student_logprobs, teacher_logprobs, mask, divergence=config.divergence,
                                  estimator=config.estimator, gamma=config.gamma,
                                  log_ratio_clip=config.log_ratio_clip, center=config.center_weight)
    divergence = get_divergence(config.divergence)
    log_ratio = (teacher_logprobs - student_logprobs).clamp(-(config.log_ratio_clip or math.inf),
                                                            config.log_ratio_clip or math.inf)
    total = mask.sum().clamp(min=1)
    metrics = {}
    for name in sorted({route or "default" for route in routes}):
        rows = torch.tensor([(route or "default") == name for route in routes])
        tokens = mask & rows[:, None]
        count = tokens.sum().clamp(min=1)
        metrics[f"teacher/{name}/token_share"] = float(tokens.sum() / total)
        metrics[f"teacher/{name}/divergence"] = float(torch.where(tokens, divergence.f(log_ratio), 0.0).sum() / count)
        metrics[f"teacher/{name}/advantage_abs_mean"] = float(advantages.abs()[tokens].sum() / count)
    return metrics


def combine(parts: list[dict]) -> dict:
    """Merge micro-batch metrics: token-weighted means, max of maxima, sums of counts and losses."""
    tokens = sum(part["num_tokens"] for part in parts) or 1.0
    merged = {key: sum(part[key] * part["num_tokens"] for part in parts) / tokens for key in parts[0]}
    merged["advantage_abs_max"] = max(part["advantage_abs_max"] for part in parts)
    merged["num_tokens"] = tokens
    merged["loss"] = sum(part["loss"] for part in parts)  # each part is already divided by the global count
    return merged


def lr_lambda(config: TrainConfig):
    """Linear warm-up, then constant, linear or cosine decay to zero over the optimizer steps."""
    total = config.steps * config.ppo_epochs
    warmup = config.warmup_steps * config.ppo_epochs

    def factor(optimizer_step: int) -> float:
        if optimizer_step < warmup:
            return (optimizer_step + 1) / warmup
        progress = (optimizer_step - warmup) / max(1, total - warmup)
        if config.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        if config.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


class Stopwatch:
    """`with clock("name"):` adds the block's wall time to timings["name"]."""

    def __init__(self, timings: dict):
        self.timings = timings

    @contextlib.contextmanager
    def __call__(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - started


class MetricsLog:
    """metrics.jsonl (one JSON object per step) and, optionally, TensorBoard scalars.

    On resume the file is cut back to the checkpoint's step, so a step is never logged twice.
    """

    def __init__(self, out: Path, keep_through: int, tensorboard: bool, enabled: bool = True):
        self.enabled, self.last_accuracy, self.handle, self.writer = enabled, float("nan"), None, None
        if not enabled:  # a data-parallel worker other than process 0
            return
        self.path = out / "metrics.jsonl"
        kept = []
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= keep_through]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self.last_accuracy = next((json.loads(line)["greedy_accuracy"] for line in reversed(kept)
                                   if "greedy_accuracy" in json.loads(line)), float("nan"))
        self.handle = open(self.path, "a")
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: it is slow to import

            self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=keep_through + 1)

    def write(self, record: dict) -> dict:
        if not self.enabled:
            return record
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()
        if "greedy_accuracy" in record:
            self.last_accuracy = record["greedy_accuracy"]
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self.writer.add_scalar(key, value, record["step"])
        return record

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
        if self.writer is not None:
            self.writer.close()
