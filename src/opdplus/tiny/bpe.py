"""A small byte-level BPE tokenizer for the tiny cross-tokenizer teacher (`tiny:arith-teacher-bpe`).

Cross-tokenizer distillation needs a teacher whose tokens are not the student's characters. This tokenizer is
trained locally with `tokenizers` on task text, byte-level like GPT-2 / Llama 3 tokenizers (with its own
pre-tokenization regex), so its merges make multi-character tokens while the student reads one character per
token. Text is first cut after each digit, keeping one following non-digit with it, so the merges join a number's
last digit with the operator after it ("94+79=173" is "9" "4+" "7" "9=" "1" "7" "3"). Merging digit pairs
instead ("94" "+" "79") made arithmetic a 90x90 lookup table: the tiny teacher reached 14% greedy accuracy
after 1500 steps. With these merges it learns more slowly than the character teacher, hence 3000 steps (greedy
accuracy 8.6% at step 500, 86% at 1000, 94% at 1500, 99.6% at 3000). It keeps the character tokenizer's special tokens by name and its chat
template, but they come after the learned vocabulary, so every id differs from the student's.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from opdplus.tiny.tokenizer import SPECIAL_TOKENS, wrap_tiny_backend

_SPECIAL_SPLIT = re.compile("|".join(re.escape(token) for token in SPECIAL_TOKENS))


def _ordinary_pieces(texts: Iterable[str]) -> Iterator[str]:
    """The text between special tokens: what the BPE model sees once the specials are matched whole."""
    for text in texts:
        yield from (piece for piece in _SPECIAL_SPLIT.split(text) if piece)


def build_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer of at most `vocab_size` tokens (specials included) on rendered conversations.

    Byte-level: all 256 bytes are in the base alphabet, so any text encodes without <|unk|> and decodes back
    exactly (spaces and newlines included). The special tokens are left out of training and appended last.
    """
    n_learned = vocab_size - len(SPECIAL_TOKENS)
    if n_learned <= 256:
        raise ValueError(f"vocab_size must exceed {256 + len(SPECIAL_TOKENS)} (256 bytes + specials), got {vocab_size}")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\d[^\d]?"), behavior="isolated"),  # a digit and the character after it
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # bytes only: the Split cuts
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=n_learned,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_ordinary_pieces(texts), trainer=trainer)
    backend.add_special_tokens(SPECIAL_TOKENS)  # matched whole before BPE; ids after the learned vocabulary
    return wrap_tiny_backend(backend)
