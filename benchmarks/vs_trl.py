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

Three arms take part: our sampled-token OPD+ (`--estimator opd+`), our dense estimator (`--estimator dense`: the
trainer's own path, `LocalTeacher.distribution` then `optimize`, the divergence over the whole vocabulary at every
response position, differentiated directly) and TRL's trainer, which also computes the generalized JSD over the
whole vocabulary at every completion position. All use jsd with beta 0.5 and the same convention: TRL's mixture is
m = (1 - beta) p_student + beta p_teacher and its loss beta KL(p_teacher || m) + (1 - beta) KL(p_student || m), which
is exactly our jsd:beta, sum_y p f(q / p) with f(u) = beta u log u - (beta u + 1 - beta) log(beta u + 1 - beta), for
the same beta. The reductions differ: TRL divides the sum over positions by the number of completion tokens, ours
(sequence-sum) by the number of sequences; `loss_check` computes both on one batch and prints them side by side.
Each arm's tokens/s is also reported per run (median and range over the rounds). Peak memory: each arm runs alone
in a fresh Python process, and the growth of its peak resident set (VmHWM after the run minus VmRSS before it,
model loading included: the same float32 student and teacher on every side) is taken, MEMORY_REPEATS times.
Target: ratio (sampled OPD+ over TRL) >= 1.5; dense over TRL is reported beside it.

    python benchmarks/vs_trl.py [--quick] [--threads N] [--random-models]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
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
from opdplus.objective import Objective
from opdplus.parallel.base import SingleProcess
from opdplus.rollout import render_prompt
from opdplus.rollout.engine import make_engine
from opdplus.teachers.local import LocalTeacher
from opdplus.tasks import get_task
from opdplus.models import load_model_and_tokenizer, resolve_model
from opdplus.tiny import build_char_tokenizer, tiny_config
from opdplus.trainer import optimize, train

TASK = "arith"
SEED = 0
STEPS, ROUNDS = 21, 6  # optimizer steps per run (the first warms up) and runs per trainer
STEPS_QUICK, ROUNDS_QUICK = 11, 2
MEMORY_STEPS, MEMORY_REPEATS = 6, 3  # optimizer steps of each peak-memory run, and fresh processes per arm
ARMS = ("ours", "ours-dense", "trl")  # sampled OPD+, dense OPD+, TRL's DistillationTrainer


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
    runs: list[float] = field(default_factory=list)  # tokens/s of each run (warm-up step left out)

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

    def add_run(self, run: Run) -> None:
        self.add(run)
        self.runs.append(sum(run.tokens[1:]) / sum(run.seconds[1:]))

    def per_run(self) -> str:
        """Median and range of the runs' tokens/s."""
        return median_range(self.runs, 1)


def median_range(values: list[float], digits: int) -> str:
    return (f"median {round(statistics.median(values), digits)} (min {round(min(values), digits)}, "
            f"max {round(max(values), digits)}, {len(values)} runs)")


def step_examples(setup: Setup, step: int):
    """The prompts our trainer draws at `step` (see opdplus.trainer.train), so TRL can be given the same ones."""
    return get_task(TASK).examples("train", setup.prompts_per_step, seed=SEED * 1_000_003 + step)


# ---- opdplus -----------------------------------------------------------------------------------------------------

def run_ours(setup: Setup, out: Path, estimator: str = "opd+") -> Run:
    config = TrainConfig(
        task=TASK, student=setup.student, teacher=setup.teacher, out=str(out), overwrite=True,
        divergence="jsd", estimator=estimator,
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


# ---- the two losses on one batch -----------------------------------------------------------------------------

def loss_check(setup: Setup) -> dict:
    """Our dense jsd loss and TRL's on one batch of the student's own rollouts (step 1's prompts), from the same
    weights. Ours through the trainer's path (`LocalTeacher.distribution`, then one `optimize` call with an SGD step
    of 0): the per-position divergences summed and divided by the number of sequences. TRL's through the function
    its DistillationTrainer calls (`_chunked_divergence_loss`): the same sum divided by the number of completion
    tokens. So ours = TRL's x tokens / sequences, up to float32 rounding."""
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    torch.manual_seed(SEED)
    student, tokenizer = load_model_and_tokenizer(setup.student)
    teacher, _ = load_model_and_tokenizer(setup.teacher)
    rollouts = make_engine("hf", student, tokenizer).generate(
        step_examples(setup, 1), num_samples=setup.samples_per_prompt, max_new_tokens=setup.max_new_tokens)

    teacher_logprobs, distribution = LocalTeacher(teacher, tokenizer).distribution(rollouts)
    strategy = SingleProcess()
    strategy.wrap(student)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.0)
    strategy.attach_optimizer(optimizer, None)
    update = optimize(strategy, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
                      Objective("jsd", "dense"), rollouts, teacher_logprobs, teacher_distribution=distribution)
    ours = update.metrics["loss"]

    # TRL's inputs: each model's last hidden states before every completion token, positions counted from each
    # row's first real token (left padding) as our trainer counts them.
    mask, prompt_length = rollouts.response_mask, rollouts.prompt_length
    positions = (rollouts.attention_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        hidden = [model.base_model(input_ids=rollouts.input_ids, attention_mask=rollouts.attention_mask,
                                   position_ids=positions).last_hidden_state[:, prompt_length - 1 : -1]
                  for model in (student, teacher)]
        theirs, _, valid = _chunked_divergence_loss(hidden[0], hidden[1], student.lm_head.weight,
                                                    teacher.lm_head.weight, mask.long(), beta=0.5)
    sequences, tokens = mask.shape[0], int(valid)
    return {"ours_dense_jsd_loss (sum over positions / sequences)": ours,
            "trl_jsd_loss (sum over positions / tokens)": float(theirs),
            "sequences": sequences, "tokens": tokens,
            "trl_loss_x_tokens_over_sequences": float(theirs) * tokens / sequences,
            "relative_difference": abs(float(theirs) * tokens / sequences - ours) / abs(ours)}


# ---- peak memory -------------------------------------------------------------------------------------------------

def rss_kib(field_name: str) -> int:
    """VmRSS (now) or VmHWM (peak so far) of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def measure_memory(arm: str, setup: Setup, out: Path) -> float:
    """MiB by which one run of `arm` raises this (fresh) process's peak resident set."""
    before = rss_kib("VmRSS")
    RUNNERS[arm](setup, out)
    return (rss_kib("VmHWM") - before) / 1024


def memory_in_fresh_process(arm: str, setup: Setup, threads: int, out: Path) -> float:
    command = [sys.executable, __file__, "--memory-arm", arm, "--student", setup.student, "--teacher",
               setup.teacher, "--threads", str(threads), "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"memory run of {arm} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_growth_mib"]


RUNNERS = {"ours": run_ours, "ours-dense": lambda setup, out: run_ours(setup, out, "dense"), "trl": run_trl}


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
    # internal: one peak-memory run in this fresh process (see memory_in_fresh_process)
    parser.add_argument("--memory-arm", choices=ARMS, help=argparse.SUPPRESS)
    parser.add_argument("--student", help=argparse.SUPPRESS)
    parser.add_argument("--teacher", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars, once per model load

    if args.memory_arm:
        setup = Setup(student=args.student, teacher=args.teacher, steps=MEMORY_STEPS, rounds=1,
                      prompts_per_step=16, samples_per_prompt=4, max_new_tokens=get_task(TASK).max_new_tokens)
        print(json.dumps({"peak_rss_growth_mib": measure_memory(args.memory_arm, setup, Path(args.out))}))
        return

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.random_models:
            student, teacher = random_models(tmp / "models")
        else:
            student, teacher = resolve_model("tiny:arith-student"), resolve_model("tiny:arith-teacher")
        setup = Setup(student=student, teacher=teacher, steps=STEPS_QUICK if args.quick else STEPS,
                      rounds=ROUNDS_QUICK if args.quick else ROUNDS,
                      prompts_per_step=16, samples_per_prompt=4, max_new_tokens=get_task(TASK).max_new_tokens)

        totals = {arm: Throughput() for arm in ARMS}
        started = time.perf_counter()
        for round_ in range(setup.rounds):
            for arm in ARMS[round_ % len(ARMS):] + ARMS[:round_ % len(ARMS)]:  # each arm first in turn
                totals[arm].add_run(RUNNERS[arm](setup, tmp / f"{arm}-{round_}"))
                assert torch.get_num_threads() == args.threads, "a trainer changed the torch thread count"
        wall = time.perf_counter() - started
        ours, dense, theirs = totals["ours"], totals["ours-dense"], totals["trl"]

        memory = {arm: [] for arm in ARMS}
        for repeat in range(MEMORY_REPEATS):
            for arm in ARMS:
                memory[arm].append(memory_in_fresh_process(arm, setup, args.threads, tmp / f"memory-{arm}-{repeat}"))
        losses = loss_check(setup)

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
        losses="TRL: generalized JSD, beta=0.5, over the full vocabulary at every completion position, divided by "
               "the completion tokens; opdplus (ours): sampled-token OPD+ estimator, divergence jsd (beta=0.5); "
               "opdplus (ours-dense): --estimator dense, the same jsd over the full vocabulary at every response "
               "position, divided by the sequences (sequence-sum). TRL's beta is our jsd:beta: same divergence",
        measure="rollout tokens (through the first EOS) / summed optimizer-step wall time",
        ours_tokens_per_s=round(ours.tokens_per_second, 1),
        dense_tokens_per_s=round(dense.tokens_per_second, 1),
        trl_tokens_per_s=round(theirs.tokens_per_second, 1),
        dense_over_trl=round(dense.tokens_per_second / theirs.tokens_per_second, 4),
        ours_tokens_per_s_per_run=ours.per_run(),
        dense_tokens_per_s_per_run=dense.per_run(),
        trl_tokens_per_s_per_run=theirs.per_run(),
        ours_mean_response_tokens=round(ours.tokens / (ours.steps * setup.rows), 2),
        trl_mean_response_tokens=round(theirs.tokens / (theirs.steps * setup.rows), 2),
        dense_mean_response_tokens=round(dense.tokens / (dense.steps * setup.rows), 2),
        ours_mean_step_s=round(ours.seconds / ours.steps, 4),
        dense_mean_step_s=round(dense.seconds / dense.steps, 4),
        trl_mean_step_s=round(theirs.seconds / theirs.steps, 4),
        ours_generate_share=round(ours.generate_seconds / ours.seconds, 3),
        dense_generate_share=round(dense.generate_seconds / dense.seconds, 3),
        trl_generate_share=round(theirs.generate_seconds / theirs.seconds, 3),
        memory_measure=f"peak RSS growth (VmHWM after - VmRSS before) of one {MEMORY_STEPS}-step run alone in a "
                       f"fresh process, model loading included, {MEMORY_REPEATS} processes per arm",
        ours_peak_rss_growth_mib=median_range(memory["ours"], 1),
        dense_peak_rss_growth_mib=median_range(memory["ours-dense"], 1),
        trl_peak_rss_growth_mib=median_range(memory["trl"], 1),
        loss_check=losses,
        wall_s=round(wall, 1),
    )


if __name__ == "__main__":
    main()
