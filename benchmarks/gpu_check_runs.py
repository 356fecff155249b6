"""The two training runs benchmarks/gpu_check.py compares, each meant to run alone in a fresh process (so its
peak GPU memory is its own, and one run's vLLM engine never outlives it into the other's).

Both take a `Plan` and return per-step records; step 1 of each is left out later as warm-up.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback

TASK, SEED = "arith", 0  # as benchmarks/vs_trl.py, whose prompt order the TRL run reuses
BREAKDOWN = ("time_generate", "time_teacher", "time_student_forward", "time_backward", "time_optimizer",
             "time_update", "time_step")
# per-step sampler-trainer mismatch the trainer logs when the engine's own sampling log-probs come with the rollouts
MISMATCH = ("rollout_logprob_diff_mean", "rollout_logprob_diff_max", "rollout_kl", "rollout_ratio_truncated_fraction")


@dataclass
class Plan:
    """One run: models, hardware, batch, steps; plain values, written to JSON for the run's process."""

    student: str
    teacher: str
    out: str
    device: str  # "cuda" or "cpu"
    dtype: str  # "bfloat16" or "float32"
    generation: str  # rollouts sampled by "vllm" (colocated engine) or "hf" (the training model)
    prompts_per_step: int
    samples_per_prompt: int
    max_new_tokens: int
    steps: int
    lr: float
    vllm_memory: float  # GPU memory fraction of a colocated vLLM engine
    threads: int | None  # torch CPU threads; None leaves torch's default


def peak_memory_bytes() -> int | None:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


# ---- opdplus -----------------------------------------------------------------------------------------------------

def run_ours(plan: Plan) -> dict:
    """`opdplus train` through the library API: OPD+ with the jsd divergence, in the plan's dtype and backend."""
    from opdplus.config import TrainConfig
    from opdplus.demo import read_metrics
    from opdplus.trainer import train

    if plan.device.startswith("cuda"):
        time_phases_on_gpu()
        if plan.generation == "vllm":
            limit_vllm_sequences(plan.prompts_per_step * plan.samples_per_prompt)
    config = TrainConfig(
        task=TASK, student=plan.student, teacher=plan.teacher, out=plan.out, overwrite=True,
        divergence="jsd", estimator="opd+", device=plan.device, dtype=plan.dtype, rollout_backend=plan.generation,
        prompts_per_step=plan.prompts_per_step, samples_per_prompt=plan.samples_per_prompt,
        max_new_tokens=plan.max_new_tokens, temperature=1.0, top_k=0, top_p=1.0,
        steps=plan.steps, lr=plan.lr, lr_schedule="constant", max_grad_norm=1.0, seed=SEED,
        eval_every=0, eval_examples=1, tensorboard=False,  # evaluation and logging stay out of the steps
        vllm_gpu_memory_utilization=plan.vllm_memory,
    )
    train(config, progress=False)
    records = [record for record in read_metrics(Path(plan.out)) if record["step"] >= 1]
    measured = records[1:]  # step 1 warms up
    return {
        "tokens": [int(record["num_tokens"]) for record in records],
        "seconds": [record["time_step"] for record in records],
        "generate_seconds": [record["time_generate"] for record in records],
        "breakdown_s": {key.removeprefix("time_"): statistics.mean(record[key] for record in measured)
                        for key in BREAKDOWN if measured and all(key in record for record in measured)},
        "mismatch": {name: summarise(name, [record[name] for record in measured if name in record])
                     for name in MISMATCH},
        "peak_memory_bytes": peak_memory_bytes(),
    }


def summarise(name: str, values: list[float]) -> float | str:
    """A mismatch metric over the measured steps: the largest for a maximum, the mean otherwise; "n/a" when the
    trainer did not log it (e.g. rollouts without the engine's log-probs)."""
    if not values:
        return "n/a"
    return max(values) if name.endswith("_max") else statistics.mean(values)


def time_phases_on_gpu() -> None:
    """Make the trainer's Stopwatch wait for the GPU at both ends of each timed block. It reads the wall clock
    only, and CUDA kernels run asynchronously: without this, a block's queued work is billed to the next block
    that waits for a result. The step total (`time_step`) ends with logging, which waits anyway."""
    from opdplus import metrics

    untimed = metrics.Stopwatch.__call__

    @contextlib.contextmanager
    def timed(self, name: str):
        torch.cuda.synchronize()
        with untimed(self, name):
            yield
            torch.cuda.synchronize()

    metrics.Stopwatch.__call__ = timed


def limit_vllm_sequences(max_num_seqs: int) -> None:
    """At most the step's rollouts in flight in the colocated engine, as TRL does (the trainer has no setting for
    it; its GPU share is the trainer's vllm_gpu_memory_utilization), added where the trainer builds the engine."""
    from opdplus.rollout import engine

    if not hasattr(engine, "VLLMEngine"):
        raise RuntimeError("opdplus.rollout.engine no longer builds VLLMEngine by that name: update gpu_check")
    engine.VLLMEngine = functools.partial(engine.VLLMEngine, max_num_seqs=max_num_seqs)


# ---- TRL ---------------------------------------------------------------------------------------------------------

def run_trl(plan: Plan) -> dict:
    """TRL's DistillationTrainer with benchmarks/vs_trl.py's settings, counters and prompt order, on the plan's
    device and dtype; generation by `generate` or, with plan.generation == "vllm", TRL's colocated vLLM."""
    from transformers import PrinterCallback
    from trl import DistillationConfig

    import vs_trl
    from opdplus.models import load_model_and_tokenizer

    assert (vs_trl.TASK, vs_trl.SEED) == (TASK, SEED), "vs_trl's task or seed changed: the prompts would differ"
    setup = vs_trl.Setup(student=plan.student, teacher=plan.teacher, steps=plan.steps, rounds=1,
                         prompts_per_step=plan.prompts_per_step, samples_per_prompt=plan.samples_per_prompt,
                         max_new_tokens=plan.max_new_tokens, lr=plan.lr)
    dtype = getattr(torch, plan.dtype)
    student, tokenizer = load_model_and_tokenizer(setup.student, dtype)  # the same loading as our trainer's
    teacher, _ = load_model_and_tokenizer(setup.teacher, dtype)
    tokenizer.padding_side = "left"
    vllm = dict(use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=plan.vllm_memory) \
        if plan.generation == "vllm" else {}
    args = DistillationConfig(
        output_dir=plan.out, seed=SEED, report_to="none", disable_tqdm=True, save_strategy="no",
        logging_steps=setup.steps + 1,
        # weights in the plan's dtype as ours, no autocast, no activation checkpointing (TRL defaults to both)
        use_cpu=plan.device == "cpu", bf16=False, gradient_checkpointing=False,
        per_device_train_batch_size=setup.rows, gradient_accumulation_steps=1, max_steps=setup.steps,
        shuffle_dataset=False, dataloader_num_workers=0,
        learning_rate=setup.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch", beta=0.5, temperature=1.0, top_k=0, top_p=1.0,
        max_completion_length=setup.max_new_tokens, disable_dropout=True, **vllm,
    )
    timer = vs_trl.StepTimer()
    callbacks = [WaitForGPU(), timer] if plan.device.startswith("cuda") else [timer]
    trainer = vs_trl.CountingDistillationTrainer(model=student, teacher_model=teacher, args=args,
                                                 train_dataset=vs_trl.trl_dataset(setup), processing_class=tokenizer,
                                                 callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)
    vs_trl.check_same_prompt_ids(trainer, tokenizer, setup)
    trainer.train()
    return {"tokens": trainer.rollout_tokens, "seconds": timer.seconds, "generate_seconds": trainer.generate_seconds,
            "peak_memory_bytes": peak_memory_bytes()}


class WaitForGPU(TrainerCallback):
    """Placed before vs_trl's StepTimer: the step's queued GPU work is finished before the timer reads the clock."""

    def on_step_begin(self, args, state, control, **kwargs):
        torch.cuda.synchronize()

    def on_step_end(self, args, state, control, **kwargs):
        torch.cuda.synchronize()
