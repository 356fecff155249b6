"""Random-initialised Qwen3-style student and teacher for benchmarks/gpu_check.py, made on the spot.

Real sizes without a download: the shapes of Qwen3-0.6B and Qwen3-1.7B (vocabulary 151,936, tied embeddings),
random weights, and a tokenizer built in code with one entry per id, so that whatever a random model samples can
be decoded. Speed and memory depend on the shapes, not on what the weights have learned; accuracy means nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from opdplus.tiny.tokenizer import ASSISTANT, CHARACTERS, CHAT_TEMPLATE, END, PAD, SPECIAL_TOKENS, UNK, USER


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class Sizes:
    name: str
    vocab: int
    student: Shape
    teacher: Shape


# Qwen3-0.6B and Qwen3-1.7B as published (config.json of each): 28 layers, GQA 16/8 heads of 128, tied embeddings.
REAL = Sizes("qwen3-0.6b / qwen3-1.7b shapes", 151_936,
             student=Shape(layers=28, hidden=1024, intermediate=3072, heads=16, kv_heads=8, head_dim=128),
             teacher=Shape(layers=28, hidden=2048, intermediate=6144, heads=16, kv_heads=8, head_dim=128))
# The same code path on a CPU in seconds; head size 32 is one vLLM's CPU attention has kernels for.
SMOKE = Sizes("tiny qwen3 (smoke)", 1_000,
              student=Shape(layers=2, hidden=64, intermediate=128, heads=2, kv_heads=1, head_dim=32),
              teacher=Shape(layers=2, hidden=128, intermediate=256, heads=4, kv_heads=2, head_dim=32))

# Prompts of the arith task are ~20 tokens and responses at most a few hundred: vLLM sizes its per-sequence limit
# from this (Qwen3's own 40,960 only costs start-up memory here).
MAX_POSITIONS = 4096


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """The tiny models' character tokenizer and chat template, padded with filler tokens to `vocab_size` ids.

    Prompts encode to characters exactly as with the packaged tiny models; a sampled filler id decodes to
    `<|id:N|>`, so every id the model can emit has text.
    """
    base = SPECIAL_TOKENS + list(CHARACTERS)
    if vocab_size < len(base):
        raise ValueError(f"vocab_size must be at least {len(base)}, got {vocab_size}")
    vocab = {token: index for index, token in enumerate(base)}
    vocab.update({f"<|id:{index}|>": index for index in range(len(base), vocab_size)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.add_special_tokens(SPECIAL_TOKENS)
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, unk_token=UNK, eos_token=END,
        additional_special_tokens=[USER, ASSISTANT], chat_template=CHAT_TEMPLATE, model_max_length=MAX_POSITIONS,
        padding_side="left", clean_up_tokenization_spaces=False,
    )
    assert len(tokenizer) == vocab_size, f"tokenizer has {len(tokenizer)} ids, expected {vocab_size}"
    return tokenizer


def qwen3_config(shape: Shape, tokenizer, vocab_size: int) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=vocab_size, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim, max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=True,
        rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )


def build_models(root: Path, sizes: Sizes, *, device: str, dtype: torch.dtype) -> dict:
    """Write `root/student` and `root/teacher` (safetensors, config, tokenizer); return their paths and sizes.

    Weights are initialised on `device` (seconds on a GPU for 2.3B parameters, far longer on a CPU) and saved in
    `dtype`, the precision the run trains in.
    """
    tokenizer = build_tokenizer(sizes.vocab)
    built = {}
    for seed, (role, shape) in enumerate((("student", sizes.student), ("teacher", sizes.teacher))):
        torch.manual_seed(seed)
        with torch.device(device):
            model = Qwen3ForCausalLM(qwen3_config(shape, tokenizer, sizes.vocab)).to(dtype)
        path = root / role
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        built[role] = str(path)
        built[f"{role}_parameters"] = sum(parameter.numel() for parameter in model.parameters())
        del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return built
