"""Objects from a TrainConfig: what `TrainConfig.validate()` cannot know without this machine, and what it builds.

The trainer's setup and `opdplus eval` call these after `validate()` and before anything is written, so a missing
package, an absent device or a broken tool module fails the run as early as a bad value does.
"""

from __future__ import annotations

import importlib.util

import torch

from opdplus.config import TrainConfig
from opdplus.trackers import check_trackers_installed, tracker_names


def check_environment(config: TrainConfig) -> None:
    """Raise ValueError naming the first setting this machine cannot serve (packages, tools module, devices)."""
    if config.lora_r and importlib.util.find_spec("peft") is None:
        raise ValueError("lora_r needs peft: pip install peft")
    if config.tools:
        from opdplus.tools import load_tools

        load_tools(config.tools)  # imports the user's module: a typo fails here, not at the first rollout
    check_trackers_installed(tracker_names(config.report_to))
    if config.rollout_backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ValueError("rollout_backend vllm needs vLLM in this environment: pip install 'opdplus[vllm]'")
    for name in ("device", "teacher_device"):
        value = getattr(config, name)
        if value not in (None, "auto") and not device_available(value):
            raise ValueError(f"{name} {value!r} is not available on this machine")


def build_task(config: TrainConfig):
    """The task, wrapped in its tools when `tools` is set."""
    from opdplus.tasks import get_task

    task = get_task(config.task, data=config.data, test_data=config.test_data, question_field=config.question_field,
                    answer_field=config.answer_field, teacher_field=config.teacher_field,
                    max_new_tokens=config.max_new_tokens)
    if config.tools:
        from opdplus.tasks.withtools import WithTools
        from opdplus.tools import load_tools

        task = WithTools(task, load_tools(config.tools), config.max_tool_turns)
    return task


def teacher_specs(config: TrainConfig) -> dict[str, tuple[str, dict]]:
    """name -> (spec, get_teacher options): served teachers get `teacher_api`, local ones the dtype and device."""
    specs = {}
    for name, entry in config.teacher_entries().items():
        options = {key: value for key, value in entry.items() if key != "spec"}
        if entry["spec"].startswith(("http://", "https://")):
            options.setdefault("api", config.teacher_api)
        else:
            options.setdefault("dtype", config.dtype)
            options.setdefault("device", config.teacher_device or resolve_device(config))
        specs[name] = (entry["spec"], options)
    return specs


def build_teachers(config: TrainConfig, student_tokenizer, notice=print):
    """The run's teachers behind one router, each checked against the student's tokenizer.

    A teacher whose tokenizer differs (a local one's own; a served one's `tokenizer`) or that has a system prompt
    reads text rather than the student's ids (`RetokenizingTeacher`): its ids are mapped one to one when every
    student token is one of its tokens, else the loss becomes span-level. `notice` gets one line per such teacher.
    """
    from opdplus.models import load_tokenizer
    from opdplus.objective import parse_estimator
    from opdplus.teachers import get_teacher
    from opdplus.teachers.cross import RetokenizingTeacher
    from opdplus.teachers.routing import TeacherRouter

    teachers = {}
    for name, (spec, options) in teacher_specs(config).items():
        system_prompt, tokenizer_spec = options.pop("system_prompt", None), options.pop("tokenizer", None)
        teacher = get_teacher(spec, **options)
        tokenizer = getattr(teacher, "tokenizer", None) or (
            load_tokenizer(tokenizer_spec) if tokenizer_spec else student_tokenizer)
        if tokenizer is not student_tokenizer or system_prompt:
            teacher = RetokenizingTeacher(teacher, tokenizer, student_tokenizer, system_prompt=system_prompt,
                                          name=getattr(teacher, "name", name))
            if teacher.mode == "same" and not system_prompt:
                teacher = teacher.inner  # the student's vocabulary and prompt: nothing to translate
            elif teacher.mode != "same":
                where = "teacher" if name == "default" else f"teacher {name!r}"
                if parse_estimator(config.estimator)[0] not in ("opd", "opd+"):
                    raise ValueError(f"--estimator {config.estimator} needs a teacher that reads the student's token "
                                     f"ids; {where} ({spec}) has another tokenizer: use opd+ (or opd)")
                notice(f"{where} ({spec}) has another tokenizer: " + (
                    "its ids are mapped one to one (every student token is one of its tokens), token-level OPD+"
                    if teacher.mode == "mapped" else
                    "span-level OPD+ on text aligned between the two tokenizations (docs/theory.md, spans)"))
        teachers[name] = teacher
    router = TeacherRouter(teachers)
    router.check_tokenizer(student_tokenizer)  # every id sent to a teacher must mean to it what it means to us
    return router


def resolve_device(config: TrainConfig) -> str:
    """The student's device: `device`, where "auto" is cuda when available, else cpu."""
    if config.device != "auto":
        return config.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_available(name: str) -> bool:
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
