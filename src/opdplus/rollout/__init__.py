"""Rollouts: prompts rendered and padded, responses sampled by an engine (HF or vLLM), evaluation.

    prompts.py     chat-template rendering, encoding, padding, EOS and pad ids
    rollouts.py    `Rollouts`, the batch layout every engine returns
    sampler.py     the exact KV-cache sampling loop, y ~ p_θ
    responses.py   one response per prompt: that loop, or HF generate for a modified distribution
    hf.py          `HFEngine`: single-turn and multi-turn (tool) rollouts with the training model
    vllm.py        `VLLMEngine`: a colocated vLLM engine, synced with the student's weights
    engine.py      `RolloutEngine` and `make_engine`
    evaluation.py  greedy accuracy, avg@k, pass@k
"""

from opdplus.rollout.engine import RolloutEngine, make_engine
from opdplus.rollout.hf import HFEngine
from opdplus.rollout.prompts import (conversation, encode_prompts, eos_token_ids, left_pad, pad_token_id,
                                     render_conversation, render_prompt, right_pad)
from opdplus.rollout.responses import eval_mode
from opdplus.rollout.rollouts import Rollouts, mask_through_first_eos

__all__ = [
    "HFEngine",
    "RolloutEngine",
    "Rollouts",
    "conversation",
    "encode_prompts",
    "eos_token_ids",
    "eval_mode",
    "left_pad",
    "make_engine",
    "mask_through_first_eos",
    "pad_token_id",
    "render_conversation",
    "render_prompt",
    "right_pad",
]
