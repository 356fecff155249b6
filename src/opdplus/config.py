"""Training configuration: one dataclass of plain settings, and a check of their values.

Nothing here loads, imports or probes anything: the objects a run needs (task, teachers, device) are built from a
TrainConfig in `opdplus.build`, and the `opdplus train` flags and YAML files are read in `opdplus.cli`. Each field
carries the sentence `opdplus train --help` shows for it and the group it is listed under.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from opdplus.objective import get_divergence, parse_estimator
from opdplus.objective.advantages import check_positive_or_unset
from opdplus.objective.checks import check_objective_settings
from opdplus.trackers import tracker_names

LR_SCHEDULES = ("constant", "linear", "cosine")
MAX_INT = 2**63 - 1  # every count fits a torch int64
MAX_SEED = 2**32 - 1  # seed * 1_000_003 + step must stay a valid torch seed
LARGEST_FINITE = {"float32": 3.4e38, "bfloat16": 3.4e38, "float16": 65504.0}

DISTILL = "what to distill"
DATA = "data"
TOOLS = "tools"
ESTIMATOR = "estimator"
HARDWARE = "hardware"
ROLLOUTS = "rollouts"
OPTIMISATION = "optimisation"
RUN = "evaluation, logging, checkpoints"


def setting(default, group: str, help: str):
    """A TrainConfig field with its one-sentence documentation and its group in `--help`."""
    return dataclasses.field(default=default, metadata={"group": group, "help": help})


@dataclass
class TrainConfig:
    task: str = setting("arith", DISTILL, "Task to train on: arith, toolcall, mix, math or tooluse.")
    student: str = setting("tiny:arith-student", DISTILL, "Model to train: a model directory, a tiny: name or a "
                           "Hugging Face hub id.")
    teacher: str = setting("tiny:arith-teacher", DISTILL, "Teacher that scores the student's tokens: a model "
                           "directory, a tiny: name or the URL of a vLLM/SGLang server.")
    teacher_api: str = setting("vllm", DISTILL, "Server protocol of a URL teacher: vllm or sglang.")
    teachers: dict | None = setting(None, DISTILL, "Several teachers (YAML only): name -> spec, or name -> {spec: "
                                    "..., api: ..., temperature: ...}; each example names its teacher in its "
                                    "teacher_field, and `teacher` serves examples that name none.")
    teacher_system_prompt: str | None = setting(None, DISTILL, "A system message only `teacher` reads (a privileged "
                                                "teacher, e.g. hints for self-distillation); a teachers: entry "
                                                "sets its own `system_prompt`.")
    teacher_tokenizer: str | None = setting(None, DISTILL, "Tokenizer of a served `teacher` (directory, tiny: name "
                                            "or hub id) when it is not the student's: ids are mapped or the loss "
                                            "becomes span-level (docs/theory.md); a teachers: entry sets its own "
                                            "`tokenizer`. Local teachers bring their own.")
    out: str = setting("runs/train", DISTILL, "Run directory for metrics, checkpoints and the final model.")

    data: str | None = setting(None, DATA, "Training data of the math and tooluse tasks (JSONL, JSON or Parquet); "
                               "the built-in tasks generate their own.")
    test_data: str | None = setting(None, DATA, "Held-out data for evaluation (math and tooluse); without it "
                                    "evaluation is skipped.")
    question_field: str = setting("question", DATA, "Record field that holds the question.")
    answer_field: str = setting("answer", DATA, "Record field that holds the reference answer.")
    teacher_field: str = setting("teacher", DATA, "With several teachers, the record field that names each "
                                 "example's teacher.")

    tools: str | None = setting(None, TOOLS, "Tools for multi-turn rollouts: a built-in set (arithmetic) or "
                                "module:attribute naming a list of typed, documented functions; their results are "
                                "masked out of the loss.")
    max_tool_turns: int = setting(4, TOOLS, "Assistant turns per tool rollout (max_new_tokens is per turn).")

    divergence: str = setting("rkl", ESTIMATOR, "f-divergence to minimise: rkl, fkl, jsd, jsd:<beta>, tv, "
                              "hellinger, chi2, neyman_chi2 or alpha:<a>.")
    estimator: str = setting("opd+", ESTIMATOR, "opd+ (exact weight of the sampled token), opd (stop-gradient "
                             "reward), dense (the whole next-token divergence, local teacher) or topk:K (the "
                             "teacher's K likeliest tokens and a tail bucket).")
    gamma: float = setting(0.0, ESTIMATOR, "Discount in [0, 1] of future tokens' terms: 0 is the per-token "
                           "objective, 1 the exact sequence-level one.")
    log_ratio_clip: float | None = setting(10.0, ESTIMATOR, "Clamp of the log-ratio teacher - student (fkl and "
                                           "chi2 weights are unbounded without it); none to turn it off.")
    center_weight: bool = setting(True, ESTIMATOR, "Subtract w_f(1) from the opd+ weight: the same expected "
                                  "gradient with less variance (measured: benchmarks/centering.py); "
                                  "--no-center-weight for the plain weight.")
    reward_weight: float = setting(0.0, ESTIMATOR, "Weight lambda of the task's outcome reward mixed into every "
                                   "response token's advantage (leave-one-out baseline over a prompt's samples): "
                                   "the gradient of lambda E[R] - D.")
    loss_reduction: str = setting("sequence-sum", ESTIMATOR, "Loss normaliser: sequence-sum (each response's token "
                                  "sum averaged over the step's responses: unbiased) or token-mean (divided by "
                                  "the step's sampled token count: biased when lengths vary).")

    device: str = setting("auto", HARDWARE, "Device of the student (and of local teachers unless "
                          "teacher_device is set): auto (cuda when available, else cpu), cpu, cuda, cuda:1, ...")
    dtype: str = setting("float32", HARDWARE, "Weights of the student and local teachers: float32, bfloat16 or "
                         "float16.")
    teacher_device: str | None = setting(None, HARDWARE, "Device of local teachers (e.g. cuda:1); default: the "
                                         "student's device.")
    gradient_checkpointing: bool = setting(False, HARDWARE, "Recompute activations in the backward pass: less "
                                           "memory, more time.")
    lora_r: int = setting(0, HARDWARE, "Above 0: train LoRA adapters of this rank on every linear layer (needs "
                          "peft) instead of all weights.")
    lora_alpha: float = setting(16.0, HARDWARE, "LoRA scaling numerator (the adapters are scaled by alpha / r).")

    prompts_per_step: int = setting(16, ROLLOUTS, "Prompts drawn per training step.")
    samples_per_prompt: int = setting(4, ROLLOUTS, "Responses sampled from the student per prompt.")
    max_new_tokens: int | None = setting(None, ROLLOUTS, "Longest response in tokens (per assistant turn); unset: "
                                         "the task's own limit.")
    max_prompt_length: int | None = setting(None, ROLLOUTS, "Longest rendered prompt in tokens; longer prompts "
                                            "are skipped or fail the run (see long_prompts).")
    long_prompts: str = setting("skip", ROLLOUTS, "What prompts over max_prompt_length do: skip (counted in the "
                                "metrics) or fail.")
    rollout_backend: str = setting("hf", ROLLOUTS, "Sampler: hf (generate with the training model) or vllm (a "
                                   "colocated vLLM engine synced to it).")
    vllm_gpu_memory_utilization: float = setting(0.3, ROLLOUTS, "Share of the GPU in (0, 1] the vllm rollout "
                                                 "engine may take (vLLM's own default, 0.9, leaves the trainer "
                                                 "beside it no room); ignored on CPU.")
    temperature: float = setting(1.0, ROLLOUTS, "Sampling temperature; anything but 1.0 makes rollouts "
                                 "off-policy (a warning says so).")
    top_k: int = setting(0, ROLLOUTS, "Sample only from the k most likely tokens; 0 is off (exact on-policy).")
    top_p: float = setting(1.0, ROLLOUTS, "Nucleus sampling mass in (0, 1]; 1.0 is off (exact on-policy).")
    rollout_ratio_cap: float | None = setting(2.0, ROLLOUTS, "With another rollout engine than the trained model "
                                              "(vllm): truncation of the per-token ratio p_trainer / p_engine that "
                                              "corrects for their different numerics; none: untruncated.")

    steps: int = setting(200, OPTIMISATION, "Training steps (one batch of rollouts each).")
    lr: float = setting(1e-3, OPTIMISATION, "Peak learning rate of AdamW.")
    lr_schedule: str = setting("constant", OPTIMISATION, "Learning rate after warmup: constant, linear or cosine "
                               "decay to 0.")
    warmup_steps: int = setting(0, OPTIMISATION, "Steps of linear warmup from 0 to lr.")
    weight_decay: float = setting(0.0, OPTIMISATION, "AdamW weight decay.")
    max_grad_norm: float | None = setting(1.0, OPTIMISATION, "Clip the gradient to this global norm; none to "
                                          "turn clipping off.")
    ppo_epochs: int = setting(1, OPTIMISATION, "Updates per batch of rollouts; epochs after the first reuse "
                              "the batch, weighted by the ratio to the policy that sampled it.")
    clip_eps: float | None = setting(None, OPTIMISATION, "PPO ratio clip for the epochs after the first; unset: "
                                     "no clip.")
    micro_batch_size: int | None = setting(None, OPTIMISATION, "Rollouts per forward/backward pass (the loss "
                                           "still uses the whole batch's token count); unset: the whole batch.")
    max_bad_steps: int = setting(5, OPTIMISATION, "Consecutive steps with non-finite values before the run "
                                 "stops.")

    eval_every: int = setting(25, RUN, "Evaluate on held-out prompts every this many steps; 0 is never.")
    eval_examples: int = setting(200, RUN, "Held-out prompts per evaluation.")
    eval_k: int = setting(0, RUN, "Also report avg@k over k temperature-1 samples per prompt; 0 is greedy "
                          "accuracy only.")
    save_every: int = setting(0, RUN, "Write a checkpoint every this many steps; 0 is none until the final "
                              "model.")
    keep_last: int = setting(2, RUN, "Checkpoints kept; older ones are deleted.")
    tensorboard: bool = setting(True, RUN, "Also write TensorBoard event files beside metrics.jsonl.")
    report_to: str | list[str] = setting("none", RUN, "Trackers that also receive the metrics.jsonl rows, comma-"
                                         "separated: tensorboard, wandb, trackio or none.")
    seed: int = setting(0, RUN, "Seed of prompt order, sampling and LoRA initialisation.")
    resume: bool = setting(False, RUN, "Continue the run in out from its last checkpoint.")
    overwrite: bool = setting(False, RUN, "Replace the run in out (files that are not run files are kept).")

    def validate(self) -> "TrainConfig":
        """Raise ValueError naming the first invalid value; what needs this machine is checked in opdplus.build."""
        get_divergence(self.divergence)
        parse_estimator(self.estimator)
        check_objective_settings(gamma=self.gamma, log_ratio_clip=self.log_ratio_clip, clip_eps=self.clip_eps,
                                 reduction=self.loss_reduction, rollout_ratio_cap=self.rollout_ratio_cap,
                                 reward_weight=self.reward_weight, reduction_name="loss_reduction")
        for name in ("prompts_per_step", "samples_per_prompt", "steps", "ppo_epochs", "eval_examples", "keep_last",
                     "max_bad_steps", "max_tool_turns"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("eval_every", "save_every", "warmup_steps", "eval_k", "lora_r"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("max_grad_norm", "micro_batch_size", "max_new_tokens", "max_prompt_length"):
            check_positive_or_unset(name, getattr(self, name))
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.long_prompts not in ("skip", "fail"):
            raise ValueError(f"long_prompts must be skip or fail, got {self.long_prompts!r}")
        if self.rollout_backend not in ("hf", "vllm"):
            raise ValueError(f"rollout_backend must be hf or vllm, got {self.rollout_backend!r}")
        if not 0.0 < self.vllm_gpu_memory_utilization <= 1.0:
            raise ValueError(f"vllm_gpu_memory_utilization must be in (0, 1], got {self.vllm_gpu_memory_utilization}")
        if self.tools and self.rollout_backend != "hf":
            raise ValueError("tools: multi-turn tool rollouts run on the hf rollout backend only")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        tracker_names(self.report_to)  # raises ValueError listing the valid names
        self.check_number_ranges()
        entries = self.teacher_entries()
        if parse_estimator(self.estimator)[0] == "dense":  # the teacher's whole distribution at every position
            if any(entry["spec"].startswith(("http://", "https://")) for entry in entries.values()):
                raise ValueError("--estimator dense needs a local teacher (the whole vocabulary at every position); "
                                 "with a served teacher use --estimator topk:K")
            if self.teachers:
                raise ValueError("--estimator dense with several teachers is not supported (their heads differ); "
                                 "use --estimator topk:K")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other")
        return self

    def check_number_ranges(self) -> None:
        """Every number finite and in range before anything is loaded or written: an inf or a value that
        overflows the weights would otherwise train to non-finite weights or skip every update in silence."""
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be an integer in [0, {MAX_SEED}], got {self.seed}")
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{field.name} must be a finite number, got {value}")
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
                raise ValueError(f"{field.name} must be at most {MAX_INT}, got {value}")
        largest = LARGEST_FINITE.get(self.dtype, LARGEST_FINITE["float32"])
        if self.lr > largest * 1e-3:  # one AdamW step moves a weight by about lr
            raise ValueError(f"lr must be below {largest * 1e-3:.3g} (an AdamW step of about lr overflows "
                             f"{self.dtype} weights), got {self.lr}")
        if self.lr * self.weight_decay > 1:
            raise ValueError(f"weight_decay must be at most 1 / lr = {1 / self.lr:.3g} (AdamW multiplies every "
                             f"weight by 1 - lr * weight_decay each step), got {self.weight_decay}")

    def teacher_entries(self) -> dict[str, dict]:
        """name -> {"spec": ..., options...} as written; "default" is `teacher`, for examples that name none."""
        entries = {}
        default = {"spec": self.teacher, "system_prompt": self.teacher_system_prompt,
                   "tokenizer": self.teacher_tokenizer}
        default = {key: value for key, value in default.items() if value is not None}
        for name, entry in {"default": default, **(self.teachers or {})}.items():
            if isinstance(entry, str):
                entry = {"spec": entry}
            if not isinstance(entry, dict) or not isinstance(entry.get("spec"), str):
                raise ValueError(f"teachers: {name!r} must be a model spec or a mapping with a 'spec' key")
            check_teacher_options(f"teachers: {name!r}", entry["spec"],
                                  {key: value for key, value in entry.items() if key != "spec"})
            entries[str(name)] = entry
        return entries

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _integer(value, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and least <= value <= MAX_INT


def _number(value, *, positive: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return value > 0 if positive else value >= 0


# option -> (check, what it must be): a teacher entry's options, refused by name before anything is loaded
SHARED_TEACHER_OPTIONS = {
    "batch_size": (lambda value: _integer(value, 1), "a positive integer"),
    "system_prompt": (lambda value: isinstance(value, str) and value.strip() != "", "a non-empty string"),
    "temperature": (lambda value: _number(value, positive=True), "a positive finite number"),
}
SERVED_TEACHER_OPTIONS = {
    **SHARED_TEACHER_OPTIONS,
    "api": (lambda value: value in ("vllm", "sglang"), "vllm or sglang"),
    "tokenizer": (lambda value: isinstance(value, str) and value != "",
                  "the served model's tokenizer: a directory, a tiny: name or a hub id"),
    "model": (lambda value: value is None or (isinstance(value, str) and value != ""),
              "a served model name (null: the only one served)"),
    "timeout": (lambda value: _number(value, positive=True), "a positive finite number of seconds"),
    "max_retries": (lambda value: _integer(value, 0), "an integer >= 0"),
    "backoff": (lambda value: _number(value, positive=False), "a finite number of seconds >= 0"),
    "concurrency": (lambda value: _integer(value, 1), "a positive integer"),
}
LOCAL_TEACHER_OPTIONS = {
    **SHARED_TEACHER_OPTIONS,
    "dtype": (lambda value: value in ("float32", "bfloat16", "float16") or (
        not isinstance(value, str) and str(value) in ("torch.float32", "torch.bfloat16", "torch.float16")),
        "float32, bfloat16 or float16"),
    "device": (lambda value: (isinstance(value, str) and value != "") or type(value).__name__ == "device",
               "a device name such as cpu or cuda:1"),
}


def check_teacher_options(where: str, spec: str, options: dict) -> None:
    """Raise one-line ValueError `WHERE: ...` naming the first unknown or out-of-range option of the teacher at
    `spec`: a typo or a zero batch size would otherwise surface as a TypeError or a crash mid-run."""
    served = spec.startswith(("http://", "https://"))
    known = SERVED_TEACHER_OPTIONS if served else LOCAL_TEACHER_OPTIONS
    for option, value in options.items():
        if option == "api" and not served:
            raise ValueError(f"{where}: api={value!r} is for served teachers (http://...), not {spec!r}")
        if option not in known:
            raise ValueError(f"{where}: unknown option {option!r} for a {'served' if served else 'local'} "
                             f"teacher; valid options: {', '.join(sorted(known))}")
        if option == "api" and not known[option][0](value):
            raise ValueError(f"{where}: unknown teacher api {value!r}; choose from sglang, vllm")
        check, meaning = known[option]
        if not check(value):
            raise ValueError(f"{where}: {option} must be {meaning}, got {value!r}")
