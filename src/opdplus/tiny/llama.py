"""Tiny Llama configs, and the names and place of the tiny models that ship inside the package.

The tiny models are ordinary `LlamaForCausalLM` checkpoints (safetensors), so everything that works on them
works on a Hub model too: `opdplus.models.load_model_and_tokenizer` loads both, `tiny:<name>` only says where.
"""

from pathlib import Path

from transformers import LlamaConfig

TINY_PREFIX = "tiny:"
TINY_MODELS = ("arith-teacher", "arith-student", "toolcall-teacher", "toolcall-student", "arith-teacher-bpe")
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
