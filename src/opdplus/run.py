"""Everything one training run is made of, built from its config before the first step.

`setup_run` validates, loads, wraps and restores (on --resume) in the order that lets every mistake surface
before anything is written in the run directory; `save_final` writes the trained student as a plain Hugging
Face model. The loop itself is in opdplus.trainer.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from opdplus.build import build_task, build_teachers, check_environment, resolve_device
from opdplus.checkpoint import (
    atomic_directory,
    atomic_write_text,
    check_run_directory,
    load_training_state,
    prepare_run_directory,
    resumable_checkpoint,
    stored_run_config,
)
from opdplus.config import TrainConfig
from opdplus.metrics import MetricsLog
from opdplus.models import disable_dropout, load_model_and_tokenizer, with_lora
from opdplus.objective import Objective
from opdplus.parallel import SingleProcess, launch_sharding, make_strategy, world, zero_stage
from opdplus.rollout import encode_prompts
from opdplus.rollout.engine import RolloutEngine, make_engine
from opdplus.teachers.routing import TeacherRouter


@dataclass
class Run:
    config: TrainConfig
    out: Path
    task: object  # opdplus.tasks.Task
    tokenizer: object
    model: torch.nn.Module  # the student: a causal LM (with LoRA adapters when lora_r > 0)
    strategy: SingleProcess  # how the student is spread over processes (one, DDP, FSDP2, ZeRO)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    objective: Objective
    teachers: TeacherRouter
    engine: RolloutEngine  # where samples come from (the student itself, or a vLLM engine synced to it)
    log: MetricsLog
    evaluates: bool  # held-out evaluation is possible (built-in tasks, or --test-data given)
    test_examples: list  # held-out examples (process 0 only)
    start_step: int  # 0, or the checkpoint's step on --resume
    max_new_tokens: int


def setup_run(config: TrainConfig) -> Run:
    config.validate()
    check_environment(config)
    sharding = launch_sharding()  # "fsdp" or "deepspeed" under such a launch config, else None
    refuse_unsupported(config, sharding)
    out = Path(config.out)
    check_run_directory(out, resume=config.resume, overwrite=config.overwrite, main=world()[0] == 0)
    check_resume_settings(config, out)
    task = build_task(config)
    device, dtype = resolve_device(config), getattr(torch, config.dtype)
    model, tokenizer = load_model_and_tokenizer(config.student, dtype=dtype)
    teachers = build_teachers(config, tokenizer, notice=print if world()[0] == 0 else lambda line: None)
    evaluates = not task.reads_files or config.test_data is not None
    if not evaluates:
        warnings.warn("no --test-data: held-out evaluation is skipped", stacklevel=3)
    test_examples = task.examples("test", config.eval_examples, seed=0) if evaluates else []
    teachers.check_routes({example.teacher for example in task.examples("train", 256, seed=config.seed)})
    if config.max_prompt_length:  # too-long prompts fail (or leave nothing to train on) before anything is written
        candidates = task.load("train") if task.reads_files else task.examples("train", 256, seed=config.seed)
        drop_long_prompts(candidates, tokenizer, config)
    check_prompts_fit(task, tokenizer, config, contexts(model, teachers))
    strategy = make_strategy(sharding)
    if strategy.is_main:
        prepare_run_directory(out, overwrite=config.overwrite)

    resume_from = resumable_checkpoint(out) if config.resume else None  # the newest undamaged one
    if resume_from is not None and sharding == "deepspeed" and zero_stage() == 3:
        raise ValueError(f"--resume under DeepSpeed ZeRO-3 is not supported yet: resume {out} with "
                         "configs/accelerate/fsdp.yaml, deepspeed-zero2.yaml or ddp.yaml (checkpoints are the same)")
    if config.resume and resume_from is None and strategy.is_main:
        warnings.warn(f"--resume: no checkpoint in {out}, starting from step 0", stacklevel=3)
    if resume_from is not None and not config.lora_r:  # weights through safetensors, exactly as saved
        model = AutoModelForCausalLM.from_pretrained(resume_from, dtype=dtype, use_safetensors=True)
    if config.lora_r:
        model = with_lora(model, r=config.lora_r, alpha=config.lora_alpha, seed=config.seed, resume_from=resume_from)
    model.to(device)
    disable_dropout(model)  # sampling, scoring and training must see one and the same policy
    if config.gradient_checkpointing:  # HF models checkpoint only in train mode, hence no dropout above
        # renamed in transformers 5.x (the old name warns)
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    model.eval()

    strategy.wrap(model)
    optimizer = torch.optim.AdamW([parameter for parameter in model.parameters() if parameter.requires_grad],
                                  lr=config.lr, weight_decay=config.weight_decay)
    strategy.attach_optimizer(optimizer, config.max_grad_norm)
    if strategy.describe() and strategy.is_main:
        tqdm.write(strategy.describe())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    start_step = load_training_state(resume_from, scheduler, strategy.load_optimizer_state)["step"] if resume_from else 0
    if strategy.is_main:
        atomic_write_text(out / "config.json", json.dumps(config.to_dict(), indent=2))
    log = MetricsLog(out, keep_through=start_step if resume_from else -1, tensorboard=config.tensorboard,
                     enabled=strategy.is_main, report_to=config.report_to, config=config.to_dict())
    objective = Objective(config.divergence, config.estimator, gamma=config.gamma,
                          log_ratio_clip=config.log_ratio_clip, center=config.center_weight, clip_eps=config.clip_eps,
                          reduction=config.loss_reduction, rollout_ratio_cap=config.rollout_ratio_cap,
                          reward_weight=config.reward_weight)
    return Run(config=config, out=out, task=task, tokenizer=tokenizer, model=model, strategy=strategy,
               optimizer=optimizer, scheduler=scheduler, objective=objective, teachers=teachers,
               engine=make_engine(config.rollout_backend, model, tokenizer, task, temperature=config.temperature,
                                  top_k=config.top_k, top_p=config.top_p,
                                  gpu_memory_utilization=config.vllm_gpu_memory_utilization),
               log=log, evaluates=evaluates, test_examples=test_examples if strategy.is_main else [],
               start_step=start_step, max_new_tokens=config.max_new_tokens or task.max_new_tokens)


# settings a resumed run may change (how long it runs, how often it evaluates and saves, where and in how much memory
# it runs: micro-batches and recomputation give the same update); every other one defines the run, and --resume
# refuses a change to it
MAY_CHANGE_ON_RESUME = ("steps", "eval_every", "eval_examples", "eval_k", "save_every", "keep_last", "tensorboard",
                        "report_to", "max_bad_steps", "device", "teacher_device", "micro_batch_size",
                        "vllm_gpu_memory_utilization",
                        "gradient_checkpointing", "out", "resume", "overwrite")


def check_resume_settings(config: TrainConfig, out: Path) -> None:
    """--resume continues the same run: refuse a change to what defines it (one line listing the fields), apply
    and log the others, so that the config.json written next says what the run really does. Writes nothing."""
    stored = stored_run_config(out) if config.resume else None
    if stored is None:
        return
    current, defaults = (json.loads(json.dumps(c.to_dict())) for c in (config, TrainConfig()))
    changed = {name: (stored.get(name, defaults[name]), value) for name, value in current.items()
               if stored.get(name, defaults[name]) != value}
    refused = [name for name in changed if name not in MAY_CHANGE_ON_RESUME]
    if refused:
        raise ValueError(f"--resume: the run in {out} was made with other settings: "
                         + ", ".join(f"{name} {changed[name][0]!r} (now {changed[name][1]!r})" for name in refused)
                         + "; resume with the run's settings, or start a new run with another --out")
    applied = [name for name in changed if name not in ("resume", "overwrite", "out")]
    if applied and world()[0] == 0:
        tqdm.write("--resume: applying changed " + ", ".join(f"{name} {changed[name][0]!r} -> {changed[name][1]!r}"
                                                           for name in applied))


def refuse_unsupported(config: TrainConfig, sharding: str | None) -> None:
    """Combinations not supported yet: one line each, before anything is loaded."""
    if sharding and config.rollout_backend != "hf":
        raise ValueError(f"--rollout-backend {config.rollout_backend} under {sharding} is not supported: use ddp.yaml")
    if sharding == "deepspeed" and (config.lora_r or config.dtype != "float32"):
        raise ValueError(f"{'--lora-r' if config.lora_r else '--dtype ' + config.dtype} under DeepSpeed is not "
                         "supported yet (float32, all weights): use configs/accelerate/fsdp.yaml or ddp.yaml")


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


def contexts(student, teachers: TeacherRouter) -> dict[str, int]:
    """The longest sequence each local model takes (config.max_position_embeddings, where the config says)."""
    models = {"the student": student} | {f"teacher {name!r}": getattr(teacher, "model", None)
                                         for name, teacher in teachers.teachers.items()}
    configs = {who: getattr(model, "config", None) or getattr(getattr(model, "model", None), "config", None)
               for who, model in models.items()}  # a tempered teacher wraps its model
    found = {who: getattr(config, "max_position_embeddings", None) for who, config in configs.items()}
    return {who: context for who, context in found.items() if isinstance(context, int) and context > 0}


def check_prompts_fit(task, tokenizer, config: TrainConfig, limits: dict[str, int]) -> None:
    """Without --max-prompt-length, a prompt longer than a model's context is refused, naming it: it would
    otherwise run for minutes, into out-of-memory or silently past the positions the model knows. Checked before
    anything is written. Room for max_new_tokens after the longest prompt, and --max-prompt-length (the user's own
    bound) past the context, get a warning: responses usually end early, at EOS."""
    if not limits:
        return
    who, context = min(limits.items(), key=lambda item: item[1])
    new_tokens = config.max_new_tokens or task.max_new_tokens
    longest = config.max_prompt_length
    if not config.max_prompt_length:
        if task.reads_files:
            sets = [(f"{path}: example", task.load(split)) for split, path in (("train", config.data),
                                                                                ("test", config.test_data)) if path]
        else:
            sets = [("train example", task.examples("train", 256, seed=config.seed))]
        for where, examples in sets:
            for index, (example, ids) in enumerate(zip(examples, encode_prompts(tokenizer, examples)), start=1):
                longest = max(longest or 0, len(ids))
                if len(ids) > context:
                    name = f" (id {example.id})" if example.id is not None else ""
                    raise ValueError(f"{where} {index}{name}: a prompt of {len(ids)} tokens exceeds the context of "
                                     f"{who} ({context} tokens): pass --max-prompt-length "
                                     f"{max(1, context - new_tokens)} to drop longer prompts")
    if longest and longest + new_tokens > context and world()[0] == 0:
        warnings.warn(f"prompts of up to {longest} tokens + max_new_tokens {new_tokens} exceed the context of {who} "
                      f"({context} tokens): a long response runs past it (--max-prompt-length limits prompts)",
                      stacklevel=3)


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


def save_final(run: Run) -> None:
    """`final/`: a plain Hugging Face model directory, LoRA adapters merged. Every process must call it."""
    config, model = run.config, run.model
    weights = run.strategy.gathered_weights()  # None unless the model holds only a shard
    if not run.strategy.is_main:
        return
    if weights is not None and config.lora_r:  # merging needs whole matrices: an unsharded copy takes them
        model = with_lora(load_model_and_tokenizer(config.student, dtype=getattr(torch, config.dtype))[0],
                          r=config.lora_r, alpha=config.lora_alpha, seed=config.seed, resume_from=None)
        model.load_state_dict(weights)
        weights = None
    final_model = model.merge_and_unload() if config.lora_r else model
    atomic_directory(run.out / "final", lambda d: (final_model.save_pretrained(d, safe_serialization=True,
                                                                               state_dict=weights),
                                                  run.tokenizer.save_pretrained(d)))
