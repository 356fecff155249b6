"""Teachers: a model that scores the student's rollouts token by token, in this process or behind vLLM / SGLang."""

from __future__ import annotations

import torch

from opdplus.config import check_teacher_options
from opdplus.teachers.base import Teacher, TeacherUnavailableError, TokenRows
from opdplus.teachers.cross import RetokenizingTeacher, vocab_relation
from opdplus.teachers.local import LocalTeacher
from opdplus.teachers.sequences import score_sequences
from opdplus.teachers.served import ServedTeacher, SGLangTeacher, VLLMTeacher

SERVED_APIS = {"vllm": VLLMTeacher, "sglang": SGLangTeacher}

__all__ = [
    "LocalTeacher",
    "RetokenizingTeacher",
    "SGLangTeacher",
    "ServedTeacher",
    "Teacher",
    "TeacherUnavailableError",
    "TokenRows",
    "VLLMTeacher",
    "get_teacher",
    "score_sequences",
    "vocab_relation",
]


def get_teacher(spec: str, **options) -> Teacher:
    """`http(s)://host:port` -> a served teacher (`api="vllm"` default, or `"sglang"`); anything else (a local
    directory, a `tiny:` name, a Hub id) -> a LocalTeacher.

    Served options: model, timeout, max_retries, backoff, concurrency, batch_size, temperature (1 only).
    Local options: device, dtype (torch dtype or name, default float32), batch_size, temperature.
    """
    check_teacher_options(f"teacher {spec!r}", spec, options)  # one line naming the option, not a TypeError
    if spec.startswith(("http://", "https://")):
        api = options.pop("api", "vllm")
        if api not in SERVED_APIS:
            raise ValueError(f"unknown teacher api {api!r}; choose from {sorted(SERVED_APIS)}")
        return SERVED_APIS[api](spec, **options)
    dtype = options.pop("dtype", torch.float32)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return LocalTeacher.load(spec, dtype=dtype, **options)
