"""A character-level tokenizer for the tiny demo models.

Every printable ASCII character is its own token, so the tiny models never have
to learn sub-word segmentation and any task string can be encoded. The tokenizer
is a normal `PreTrainedTokenizerFast`, so it saves and reloads through the usual
`save_pretrained` / `AutoTokenizer.from_pretrained` path like a real model's.
"""

import string

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

PAD = "<|pad|>"
UNK = "<|unk|>"
END = "<|end|>"  # end of an assistant turn; used as EOS
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
SPECIAL_TOKENS = [PAD, UNK, END, USER, ASSISTANT]

# Digits, letters, space, newline and all ASCII punctuation (covers JSON and arithmetic).
CHARACTERS = string.digits + string.ascii_lowercase + string.ascii_uppercase + " \n" + string.punctuation

# Minimal chat format: "<|user|>question<|assistant|>answer<|end|>".
# With add_generation_prompt=True a user-only conversation ends in "<|assistant|>",
# so render(prompt) + response + "<|end|>" is exactly the rendered full conversation.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "<|user|>{{ message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "<|assistant|>{{ message['content'] }}<|end|>"
    "{%- else -%}"
    "{{ raise_exception('tiny chat template supports only user and assistant roles') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + list(CHARACTERS))}
    # BPE with no merges = split into single characters; anything outside the vocab maps to <|unk|>.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.add_special_tokens(SPECIAL_TOKENS)  # matched whole, before character splitting
    backend.decoder = decoders.Fuse()  # join characters without inserting spaces
    return wrap_tiny_backend(backend)


def wrap_tiny_backend(backend: Tokenizer) -> PreTrainedTokenizerFast:
    """A `tokenizers` backend with the tiny models' special tokens as a transformers tokenizer with their chat
    template. No post-processor: encoding never adds BOS/EOS; the chat template places the markers."""
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        unk_token=UNK,
        eos_token=END,
        additional_special_tokens=[USER, ASSISTANT],
        chat_template=CHAT_TEMPLATE,
        model_max_length=128,
        padding_side="left",  # decoder-only generation wants prompts padded on the left
        clean_up_tokenization_spaces=False,
    )
