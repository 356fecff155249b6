"""Training configuration: one dataclass, validated before anything is loaded or written."""

from __future__ import annotations

import dataclasses
import importlib.util
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from opdplus.advantages import ESTIMATORS
from opdplus.divergences import get_divergence

LR_SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class TrainConfig:
    # what to distill
    task: str = "arith"
    student: str = "tiny:arith-student"
    teacher: str = "tiny:arith-teacher"  # a model directory, a tiny: name or a vLLM/SGLang URL
    teacher_api: str = "vllm"  # for a URL teacher: "vllm" or "sglang"
    # several teachers: name -> spec, or name -> {spec: ..., api: ..., temperature: ..., ...} (get_teacher options);
    # each example names its teacher (the data field `teacher_field`); `teacher` serves examples that name none
    teachers: dict | None = None
    out: str = "runs/train"
    # data for the math / tooluse tasks (JSONL, JSON or Parquet; the built-in tasks generate their own)
    data: str | None = None
    test_data: str | None = None
    question_field: str = "question"
    answer_field: str = "answer"
    teacher_field: str = "teacher"  # with several teachers: the record field that names each example's teacher
    # multi-turn tool use: a built-in tool set ("arithmetic") or module:attribute naming a list of the user's
    # typed, documented functions; tool results are appended as tool messages and masked out of the loss
    tools: str | None = None
    max_tool_turns: int = 4  # assistant turns per rollout (max_new_tokens is per turn)
    # the estimator
    divergence: str = "rkl"
    estimator: str = "opd+"
    gamma: float = 0.0
    log_ratio_clip: float | None = 10.0  # clamp l = teacher - student; fkl / chi2 weights are unbounded
    center_weight: bool = False  # subtract w_f(1) from the opd+ weight: same expected gradient, less variance
    # hardware
    device: str = "auto"  # "auto": cuda when available, else cpu
    dtype: str = "float32"  # student and local-teacher weights: float32 or bfloat16 (where the hardware has it)
    teacher_device: str | None = None  # local teachers on another device (e.g. cuda:1); default: `device`
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, more time
    lora_r: int = 0  # > 0: train LoRA adapters of this rank on every linear layer (peft) instead of all weights
    lora_alpha: float = 16.0
    # rollouts: exact on-policy sampling unless the user changes it (then a warning)
    prompts_per_step: int = 16
    samples_per_prompt: int = 4
    max_new_tokens: int | None = None  # None: the task's own limit
    max_prompt_length: int | None = None  # rendered prompt tokens; longer prompts are skipped or fail the run
    long_prompts: str = "skip"  # "skip" (counted in metrics) or "fail"
    rollout_backend: str = "hf"  # "hf" (generate with the training model) or "vllm" (colocated engine)
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    # optimisation
    steps: int = 200
    lr: float = 1e-3
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    ppo_epochs: int = 1  # updates per batch; epochs after the first use behavior log-probs
    clip_eps: float | None = None  # PPO ratio clip for those later epochs
    micro_batch_size: int | None = None  # rows per forward/backward; the loss uses the global token count
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    # evaluation, logging, checkpoints
    eval_every: int = 25
    eval_examples: int = 200
    eval_k: int = 0  # avg@k with k temperature-1 samples per prompt; 0 = greedy accuracy only
    save_every: int = 0  # 0 = no intermediate checkpoints
    keep_last: int = 2
    tensorboard: bool = True
    seed: int = 0
    resume: bool = False
    overwrite: bool = False

    def validate(self) -> "TrainConfig":
        """Raise ValueError naming the first invalid field."""
        get_divergence(self.divergence)
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {self.estimator!r}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")
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
        for name in ("log_ratio_clip", "clip_eps", "max_grad_norm", "micro_batch_size", "max_new_tokens",
                     "max_prompt_length"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive or unset, got {value}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.lora_r and importlib.util.find_spec("peft") is None:
            raise ValueError("lora_r needs peft: pip install peft")
        if self.long_prompts not in ("skip", "fail"):
            raise ValueError(f"long_prompts must be skip or fail, got {self.long_prompts!r}")
        if self.rollout_backend not in ("hf", "vllm"):
            raise ValueError(f"rollout_backend must be hf or vllm, got {self.rollout_backend!r}")
        if self.tools and self.rollout_backend != "hf":
            raise ValueError("tools: multi-turn tool rollouts run on the hf rollout backend only")
        if self.tools:
            from opdplus.tools import load_tools

            load_tools(self.tools)
        if self.rollout_backend == "vllm" and importlib.util.find_spec("vllm") is None:
            raise ValueError("rollout_backend vllm needs vLLM in this environment: pip install 'opdplus[vllm]'")
        for name in ("device", "teacher_device"):
            value = getattr(self, name)
            if value not in (None, "auto") and not _device_available(value):
                raise ValueError(f"{name} {value!r} is not available on this machine")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        self.teacher_specs()  # validates the teachers mapping
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other")
        return self

    def make_task(self):
        from opdplus.tasks import get_task

        task = get_task(self.task, data=self.data, test_data=self.test_data, question_field=self.question_field,
                        answer_field=self.answer_field, teacher_field=self.teacher_field,
                        max_new_tokens=self.max_new_tokens)
        if self.tools:
            from opdplus.tasks.withtools import WithTools
            from opdplus.tools import load_tools

            task = WithTools(task, load_tools(self.tools), self.max_tool_turns)
        return task

    def teacher_specs(self) -> dict[str, tuple[str, dict]]:
        """name -> (spec, get_teacher options); "default" is `teacher`, for examples that name none."""
        entries = {"default": self.teacher, **(self.teachers or {})}
        specs = {}
        for name, entry in entries.items():
            if isinstance(entry, str):
                entry = {"spec": entry}
            if not isinstance(entry, dict) or not isinstance(entry.get("spec"), str):
                raise ValueError(f"teachers: {name!r} must be a model spec or a mapping with a 'spec' key")
            options = {key: value for key, value in entry.items() if key != "spec"}
            if entry["spec"].startswith(("http://", "https://")):
                options.setdefault("api", self.teacher_api)
            else:
                options.setdefault("dtype", self.dtype)
                options.setdefault("device", self.teacher_device or self.resolved_device())
            specs[str(name)] = (entry["spec"], options)
        return specs

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [field.name for field in dataclasses.fields(cls)]


def _device_available(name: str) -> bool:
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        return False
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()
    backend = getattr(torch, device.type, None)  # mps, xpu, ...
    return bool(backend is not None and getattr(backend, "is_available", lambda: False)())


def load_yaml_config(path: str | Path) -> dict:
    """Read a run config: a YAML mapping of TrainConfig fields. Unknown keys and wrong types are reported as
    `file:line: ...` so that a typo cannot silently fall back to a default."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        root = yaml.compose(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ValueError(f"{where}: invalid YAML: {getattr(error, 'problem', error)}") from None
    if root is None:
        return {}
    if not isinstance(root, yaml.MappingNode):
        raise ValueError(f"{path}:{root.start_mark.line + 1}: expected a mapping of settings")
    hints = typing.get_type_hints(TrainConfig)
    values = {}
    for key_node, value_node in root.value:
        key, line = key_node.value, key_node.start_mark.line + 1
        if key not in hints:
            raise ValueError(f"{path}:{line}: unknown key {key!r}; valid keys: {', '.join(hints)}")
        if key in values:
            raise ValueError(f"{path}:{line}: duplicate key {key!r}")
        try:  # safe_load: tags such as !!python/object are refused, never constructed
            value = yaml.safe_load(yaml.serialize(value_node))
        except yaml.YAMLError as error:
            raise ValueError(f"{path}:{line}: {key}: {getattr(error, 'problem', None) or error}") from None
        expected = tuple(t for t in (typing.get_args(hints[key]) or (hints[key],)))
        if float in expected and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in expected)
            raise ValueError(f"{path}:{line}: {key} must be {names}, got {value!r}")
        values[key] = value
    return values
