"""Rollout throughput of opdplus's trainer over TRL's on-policy distillation trainer, measured side by side.

Both trainers distill `tiny:arith-teacher` into `tiny:arith-student` on the same prompts, in this process, with
the same torch threads, float32 weights, batch, sampling settings, lengths, learning rate and number of optimizer
steps. Throughput = rollout tokens / seconds spent in training steps, where

  * rollout tokens are the sampled response tokens up to and including the first EOS (our trainer logs them as
    `num_tokens`; for TRL they are counted from the completion ids its `_generate` returns, already cut after the
    first EOS), and
  * step seconds are the wall time of each optimizer step: our trainer's logged `time_step`, TRL's time from
    `on_step_begin` to `on_step_end` (generation, teacher forward, loss, backward, clipping, optimizer step).

Step 1 of each run warms up and is left out on both sides; setup, model loading, our step-0 evaluation and TRL's
end-of-training bookkeeping are outside the steps. The two trainers take turns over several rounds (ours first in
rounds 1, 3, ..., TRL first in rounds 2, 4, ...) so that a change in the shared machine's speed hits both alike.

The losses differ by design: TRL computes the generalized JSD (beta) over the full vocabulary at every completion
position; ours is the sampled-token OPD+ estimator for the same divergence (`jsd`, beta 0.5 on both sides).
Target: ratio >= 1.5.

    python benchmarks/vs_trl.py [--quick] [--threads N] [--random-models]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local

import torch
import transformers
import trl
from datasets import Dataset
from transformers import LlamaForCausalLM, PrinterCallback, TrainerCallback
from trl import DistillationConfig, DistillationTrainer

from common import report
from opdplus.config import TrainConfig
from opdplus.demo import read_metrics
from opdplus.rollout import render_prompt
from opdplus.tasks import get_task
from opdplus.models import load_model_and_tokenizer, resolve_model
from opdplus.tiny import build_char_tokenizer, tiny_config
from opdplus.trainer import train

TASK = "arith"
SEED = 0
STEPS, ROUNDS = 21, 6  # optimizer steps per run (the first warms up) and runs per trainer
STEPS_QUICK, ROUNDS_QUICK = 11, 2


@dataclass
class Setup:
    student: str  # a model directory
    teacher: str
    steps: int  # optimizer steps per run, the first of which warms up
    rounds: int  # runs of each trainer, alternating
    prompts_per_step: int
    samples_per_prompt: int
    max_new_tokens: int
    lr: float = 1e-5  # small, so the students' response lengths drift apart as little as possible

    @property
    def rows(self) -> int:
        return self.prompts_per_step * self.samples_per_prompt


@dataclass
class Run:
    """Per optimizer step of one training run: rollout tokens, step seconds, and the seconds of those spent
    sampling the rollouts."""

    tokens: list[int]
    seconds: list[float]
    generate_seconds: list[float]


@dataclass
class Throughput:
    tokens: int = 0
    seconds: float = 0.0
    generate_seconds: float = 0.0
    steps: int = 0

    def add(self, run: Run) -> None:
        """Add one run's measured steps, dropping the first (warm-up) step."""
        lengths = {len(run.tokens), len(run.seconds), len(run.generate_seconds)}
        assert len(lengths) == 1, f"per-step records disagree in number: {lengths}"
        self.tokens += sum(run.tokens[1:])
        self.seconds += sum(run.seconds[1:])
        self.generate_seconds += sum(run.generate_seconds[1:])
        self.steps += len(run.seconds) - 1

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


def step_examples(setup: Setup, step: int):
    """The prompts our trainer draws at `step` (see opdplus.trainer.train), so TRL can be given the same ones."""
    return get_task(TASK).examples("train", setup.prompts_per_step, seed=SEED * 1_000_003 + step)


# ---- opdplus -----------------------------------------------------------------------------------------------------

def run_ours(setup: Setup, out: Path) -> Run:
    config = TrainConfig(
        task=TASK, student=setup.student, teacher=setup.teacher, out=str(out), overwrite=True,
        divergence="jsd", estimator="opd+",
        prompts_per_step=setup.prompts_per_step, samples_per_prompt=setup.samples_per_prompt,
        max_new_tokens=setup.max_new_tokens, temperature=1.0, top_k=0, top_p=1.0,
        steps=setup.steps, lr=setup.lr, lr_schedule="constant", max_grad_norm=1.0, seed=SEED,
        eval_every=0, eval_examples=1, tensorboard=False,  # evaluation and logging stay out of the steps
    )
    train(config, progress=False)
    records = [record for record in read_metrics(out) if record["step"] >= 1]
    return Run(tokens=[int(record["num_tokens"]) for record in records],
               seconds=[record["time_step"] for record in records],
               generate_seconds=[record["time_generate"] for record in records])


# ---- TRL ---------------------------------------------------------------------------------------------------------

class CountingDistillationTrainer(DistillationTrainer):
    """TRL's trainer, unchanged except that it records how many tokens each generation call sampled and how long
    the call took (prompt tokenization + `generate` + its bookkeeping)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rollout_tokens: list[int] = []
        self.generate_seconds: list[float] = []

    def _generate(self, prompts):
        started = time.perf_counter()
        result = super()._generate(prompts)
        self.generate_seconds.append(time.perf_counter() - started)
        completion_ids = result[1]  # per row, the sampled ids through the first EOS
        self.rollout_tokens.append(sum(len(ids) for ids in completion_ids))
        return result


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step: generation, teacher, loss, backward, clipping and the optimizer."""

    def __init__(self):
        self.seconds: list[float] = []
        self._started = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._started)


def trl_dataset(setup: Setup) -> Dataset:
    """Row i of step s is our trainer's row i of step s: its prompts in order, each repeated samples_per_prompt
    times (TRL samples one completion per row). Read in order (shuffle_dataset=False), one step per batch."""
    prompts = []
    for step in range(1, setup.steps + 1):
        for example in step_examples(setup, step):
            prompts += [[{"role": "user", "content": example.prompt}]] * setup.samples_per_prompt
    return Dataset.from_dict({"prompt": prompts})


def run_trl(setup: Setup, out: Path) -> Run:
    student, tokenizer = load_model_and_tokenizer(setup.student)  # the same loading as our trainer's
    teacher, _ = load_model_and_tokenizer(setup.teacher)
    tokenizer.padding_side = "left"
    args = DistillationConfig(
        output_dir=str(out), seed=SEED, report_to="none", disable_tqdm=True, save_strategy="no",
        logging_steps=setup.steps + 1,  # no intermediate logging inside the measured steps
        use_cpu=True, bf16=False, gradient_checkpointing=False,  # the defaults are bf16 and checkpointing on
        per_device_train_batch_size=setup.rows, gradient_accumulation_steps=1, max_steps=setup.steps,
        shuffle_dataset=False, dataloader_num_workers=0,
        learning_rate=setup.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch",  # torch.optim.AdamW, as ours (TRL's default is the fused variant)
        beta=0.5, temperature=1.0, top_k=0, top_p=1.0, max_completion_length=setup.max_new_tokens,
        disable_dropout=True,
    )
    timer = StepTimer()
    trainer = CountingDistillationTrainer(model=student, teacher_model=teacher, args=args,
                                          train_dataset=trl_dataset(setup), processing_class=tokenizer,
                                          callbacks=[timer])
    trainer.remove_callback(PrinterCallback)  # its end-of-training summary would clutter the report
    check_same_prompt_ids(trainer, tokenizer, setup)
    trainer.train()
    return Run(tokens=trainer.rollout_tokens, seconds=timer.seconds, generate_seconds=trainer.generate_seconds)


def check_same_prompt_ids(trainer: DistillationTrainer, tokenizer, setup: Setup) -> None:
    """Both trainers must feed the student the same prompt token ids."""
    prompts = [example.prompt for example in step_examples(setup, 1)]
    theirs, _, _ = trainer._tokenize_prompts([[{"role": "user", "content": prompt}] for prompt in prompts])
    ours = [tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"] for prompt in prompts]
    assert [list(ids) for ids in theirs] == ours, "TRL and opdplus render the prompts differently"


# ---- models ------------------------------------------------------------------------------------------------------

def random_models(root: Path) -> tuple[str, str]:
    """Untrained stand-ins with the packaged models' shapes (student 2 x 64, teacher 3 x 128), for development
    before the packaged ones exist. Random students rarely emit EOS, so nearly every response is max length."""
    tokenizer = build_char_tokenizer()
    paths = []
    for name, (layers, hidden), seed in (("student", (2, 64), 0), ("teacher", (3, 128), 1)):
        torch.manual_seed(seed)
        config = tiny_config(len(tokenizer), layers, hidden, 4, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        path = root / name
        LlamaForCausalLM(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(str(path))
    return paths[0], paths[1]


# ---- main --------------------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds (under 2 minutes)")
    # One thread by default: on a small machine shared with other jobs, two intra-op threads contending for two
    # busy cores made step times swing by 5x between runs; one thread each is far steadier.
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both trainers (default 1)")
    parser.add_argument("--random-models", action="store_true",
                        help="untrained stand-ins instead of tiny:arith-student/teacher (development only)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars, once per model load

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.random_models:
            student, teacher = random_models(tmp / "models")
        else:
            student, teacher = resolve_model("tiny:arith-student"), resolve_model("tiny:arith-teacher")
        setup = Setup(student=student, teacher=teacher, steps=STEPS_QUICK if args.quick else STEPS,
                      rounds=ROUNDS_QUICK if args.quick else ROUNDS,
                      prompts_per_step=16, samples_per_prompt=4, max_new_tokens=get_task(TASK).max_new_tokens)

        ours, theirs = Throughput(), Throughput()
        started = time.perf_counter()
        for round_ in range(setup.rounds):
            order = (("ours", run_ours, ours), ("trl", run_trl, theirs))
            for name, run, total in order if round_ % 2 == 0 else order[::-1]:
                total.add(run(setup, tmp / f"{name}-{round_}"))
                assert torch.get_num_threads() == args.threads, "a trainer changed the torch thread count"
        wall = time.perf_counter() - started

    report(
        "vs_trl", ours.tokens_per_second / theirs.tokens_per_second, ">= 1.5",
        models="random stand-ins (2x64 / 3x128)" if args.random_models else "tiny:arith-student / tiny:arith-teacher",
        trl_class=f"trl.{DistillationTrainer.__name__} (trl {trl.__version__})",
        batch=f"{setup.prompts_per_step} prompts x {setup.samples_per_prompt} samples = {setup.rows} rollouts per "
              f"step (TRL: per_device_train_batch_size={setup.rows}, each prompt repeated "
              f"{setup.samples_per_prompt}x, same prompts as ours in the same order)",
        max_new_tokens=setup.max_new_tokens,
        sampling="temperature 1, top_k 0, top_p 1",
        steps=f"{setup.rounds} round(s) x {setup.steps} optimizer steps per trainer, first step of each run "
              f"excluded: {ours.steps} measured steps each",
        lr=setup.lr,
        dtype="float32",
        torch_threads=args.threads,
        losses="TRL: generalized JSD, beta=0.5, over the full vocabulary at every completion position; "
               "opdplus: sampled-token OPD+ estimator, divergence jsd (beta=0.5)",
        measure="rollout tokens (through the first EOS) / summed optimizer-step wall time",
        ours_tokens_per_s=round(ours.tokens_per_second, 1),
        trl_tokens_per_s=round(theirs.tokens_per_second, 1),
        ours_mean_response_tokens=round(ours.tokens / (ours.steps * setup.rows), 2),
        trl_mean_response_tokens=round(theirs.tokens / (theirs.steps * setup.rows), 2),
        ours_mean_step_s=round(ours.seconds / ours.steps, 4),
        trl_mean_step_s=round(theirs.seconds / theirs.steps, 4),
        ours_generate_share=round(ours.generate_seconds / ours.seconds, 3),
        trl_generate_share=round(theirs.generate_seconds / theirs.seconds, 3),
        wall_s=round(wall, 1),
    )


if __name__ == "__main__":
    main()
