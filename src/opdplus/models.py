"""Loading a causal LM for training or scoring, and preparing it to be trained.

One loader for every model: `load_model_and_tokenizer("tiny:arith-student")` and
`load_model_and_tokenizer("Qwen/Qwen3-0.6B")` take the same code path (`tiny:` names only map to the
checkpoints packaged in opdplus/assets/tiny).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opdplus.tiny import ASSETS_DIR, TINY_MODELS, TINY_PREFIX


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
        raise FileNotFoundError(f"cannot load model {spec!r}: {_first_line(error)}") from error


def load_tokenizer(spec: str):
    """The tokenizer alone (e.g. a served teacher's, to speak its ids), from a `tiny:` name, a directory or a Hub id."""
    path = resolve_model(spec)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as error:
        raise FileNotFoundError(f"cannot load the tokenizer {spec!r}: {_first_line(error)}") from None


def _first_line(error: Exception) -> str:
    """transformers' loading errors run to many lines: their first, or the error's type when it has no text."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _load(path: str, dtype: torch.dtype):
    # Only safetensors and only code shipped with transformers: loading a checkpoint never runs its code.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False, use_safetensors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (ValueError, TypeError) as error:  # e.g. no tokenizer files beside the weights
        raise FileNotFoundError(f"cannot load the tokenizer of {path}: {_first_line(error)}") from None
    if tokenizer.pad_token is None:
        # Many Hub tokenizers have no pad token. Reusing EOS is safe here because rollout
        # masks are computed from the first EOS, never from pad ids.
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def with_lora(model, *, r: int, alpha: float, seed: int, resume_from: Path | None):
    """Wrap the model with LoRA adapters on every linear layer (fresh, or the checkpoint's when resuming);
    only the adapters train. Checkpoints then hold the adapters, `final/` the merged model."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if resume_from is not None:
        return PeftModel.from_pretrained(model, resume_from, is_trainable=True)
    lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear")
    with torch.random.fork_rng():  # the adapters' random initialisation follows the run's seed
        torch.manual_seed(seed)
        return get_peft_model(model, lora)


def disable_dropout(model) -> None:
    """Set every dropout's p to 0: sampling, scoring and training must see one and the same policy."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
