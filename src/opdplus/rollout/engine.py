"""Where the student's rollouts come from, behind one interface: `make_engine(name, ...)` and then, each step,
`engine.generate(examples, ...)` after `engine.sync_weights(model)` has given it the current weights.

- "hf" (`HFEngine`): the training model samples itself, single-turn or multi-turn with the task's tools.
- "vllm" (`VLLMEngine`): a colocated vLLM engine with its own copy of the weights, always exact on-policy.
"""

from __future__ import annotations

import os
from typing import Protocol, runtime_checkable

from opdplus.rollout.hf import HFEngine
from opdplus.rollout.prompts import eos_token_ids
from opdplus.rollout.rollouts import Rollouts
from opdplus.rollout.vllm import VLLMEngine


@runtime_checkable
class RolloutEngine(Protocol):
    def generate(self, examples: list, *, num_samples: int, max_new_tokens: int) -> Rollouts:
        """`num_samples` rollouts per example (a string or an Example), rows grouped by example."""
        ...

    def sync_weights(self, model) -> None:
        """Make the next `generate` sample from `model`'s current weights (call after each optimizer step)."""
        ...


def make_engine(name: str, model, tokenizer, task=None, *, greedy: bool = False, temperature: float = 1.0,
                top_k: int | None = 0, top_p: float = 1.0, gpu_memory_utilization: float | None = None,
                **options) -> RolloutEngine:
    """The engine for `task` (its `toolbox` and `max_turns`; None: single-turn rollouts).

    "hf" -> HFEngine(model, tokenizer, ...) with these sampling settings (`greedy` for evaluation; anything
    but temperature 1, top_k 0, top_p 1 samples off-policy, with a warning); `options`: max_prompt_length.
    "vllm" -> VLLMEngine on the student's directory (`model_dir`, default the directory the model was loaded
    from), in the model's dtype, with the model's current weights (a LoRA model's merged ones); it always samples
    on-policy, so sampling settings other than the defaults are refused; `options` go to VLLMEngine.
    `gpu_memory_utilization` caps the vLLM engine's share of a CUDA device, which it shares with the trainer;
    it is not passed for a CPU model, whose cache vLLM sizes from VLLM_CPU_KVCACHE_SPACE instead.
    """
    toolbox, max_turns = (task.toolbox, task.max_turns) if task is not None else (None, 1)
    if name == "hf":
        return HFEngine(model, tokenizer, toolbox=toolbox, max_turns=max_turns, greedy=greedy,
                        temperature=temperature, top_k=top_k, top_p=top_p, **options)
    if name == "vllm":
        if toolbox is not None:
            raise ValueError("tools: multi-turn tool rollouts run on the hf rollout backend only")
        if greedy:
            raise ValueError("the vllm rollout backend samples on-policy only; greedy decoding runs on hf")
        if (temperature, top_k or 0, top_p) != (1.0, 0, 1.0):  # silently ignoring them would surprise
            raise ValueError(f"the vllm rollout backend samples on-policy only: temperature {temperature}, top_k "
                             f"{top_k}, top_p {top_p} need --rollout-backend hf")
        model_dir = options.pop("model_dir", None) or getattr(model, "name_or_path", None)
        if not model_dir or not os.path.isdir(model_dir):
            raise ValueError("the vllm backend needs the student's directory: pass model_dir=...")
        options.setdefault("eos_token_ids", eos_token_ids(model, tokenizer))
        options.setdefault("dtype", str(model.dtype).removeprefix("torch."))  # the trainer's precision
        if gpu_memory_utilization is not None and model.device.type == "cuda":
            options.setdefault("gpu_memory_utilization", gpu_memory_utilization)
        engine = VLLMEngine(model_dir, tokenizer, **options)
        engine.sync_weights(model)  # the directory may hold older weights than the model (e.g. after a resume)
        return engine
    raise ValueError(f"unknown rollout backend {name!r}; choose 'hf' or 'vllm'")
