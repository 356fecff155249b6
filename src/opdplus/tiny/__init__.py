"""Tiny character-level models and tokenizer used for CPU-sized OPD experiments."""

from opdplus.tiny.models import TINY_MODELS, load_model_and_tokenizer, resolve_model, tiny_config
from opdplus.tiny.tokenizer import build_char_tokenizer

__all__ = ["TINY_MODELS", "build_char_tokenizer", "load_model_and_tokenizer", "resolve_model", "tiny_config"]
