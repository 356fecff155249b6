"""Tiny Llama configs and the `tiny:<name>` model registry.

The tiny models are ordinary `LlamaForCausalLM` checkpoints (safetensors) that ship
inside the package, so everything that works on them works on a Hub model too:
`load_model_and_tokenizer("tiny:arith-student")` and
`load_model_and_tokenizer("Qwen/Qwen3-0.6B")` take the same code path.
"""

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

TINY_PREFIX = "tiny:"
TINY_MODELS = ("arith-teacher", "arith-student", "toolcall-teacher", "toolcall-student")
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny"


def tiny_config(
    vocab_size: int,
    n_layers: int,
    hidden: int,
    n_heads: int,
    *,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 128,
    pad_token_id: int | None = None,
    eos_token_id: int | None = None,
) -> LlamaConfig:
    """A plain LlamaConfig for a model with a few hundred thousand parameters."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_heads,
        # 2x instead of Llama's ~2.7x: keeps the models small; the tasks need little MLP capacity.
        intermediate_size=intermediate_size or 2 * hidden,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,  # the embedding matrix is a big share of such a small model
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=None,  # the char tokenizer has no BOS; the chat template starts with <|user|>
        dtype="float32",
    )


def resolve_model(spec: str) -> str:
    """Map `tiny:<name>` to the packaged checkpoint directory; pass anything else through."""
    if not spec.startswith(TINY_PREFIX):
        return spec
    name = spec[len(TINY_PREFIX):]
    if name not in TINY_MODELS:
        available = ", ".join(TINY_PREFIX + known for known in TINY_MODELS)
        raise ValueError(f"unknown tiny model '{spec}'; available: {available}")
    path = ASSETS_DIR / name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{spec} is not built at {path}; run scripts/make_tiny_models.py")
    return str(path)


def load_model_and_tokenizer(spec: str, dtype: torch.dtype = torch.float32):
    """Load a causal LM and its tokenizer from a `tiny:` name, a local directory or a Hub id."""
    path = resolve_model(spec)
    if os.path.isabs(path) or path.startswith((".", "~")) or os.path.exists(path) or path.count("/") > 1:
        if not os.path.isdir(os.path.expanduser(path)):
            raise FileNotFoundError(f"model not found: {spec} is not a directory")
        if not os.path.isfile(os.path.join(os.path.expanduser(path), "config.json")):
            raise FileNotFoundError(f"model not found: {spec} has no config.json (not a Hugging Face model directory)")
    try:
        return _load(path, dtype)
    except OSError as error:  # hub ids offline, missing weight files: transformers' messages run to many lines
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FileNotFoundError(f"cannot load model {spec!r}: {first_line}") from error


def _load(path: str, dtype: torch.dtype):
    # Only safetensors and only code shipped with transformers: loading a checkpoint never runs its code.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False, use_safetensors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (ValueError, TypeError) as error:  # e.g. no tokenizer files beside the weights
        raise FileNotFoundError(f"cannot load the tokenizer of {path}: {str(error).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        # Many Hub tokenizers have no pad token. Reusing EOS is safe here because rollout
        # masks are computed from the first EOS, never from pad ids.
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
