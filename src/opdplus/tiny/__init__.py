"""Tiny character-level models and tokenizer used for CPU-sized OPD experiments."""

from opdplus.tiny.llama import ASSETS_DIR, TINY_MODELS, TINY_PREFIX, tiny_config
from opdplus.tiny.tokenizer import build_char_tokenizer

__all__ = ["ASSETS_DIR", "TINY_MODELS", "TINY_PREFIX", "build_char_tokenizer", "tiny_config"]
