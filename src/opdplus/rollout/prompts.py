"""Prompts as the model reads them: rendered by the chat template, encoded once, padded into a batch.

Every engine renders and encodes prompts here, so the student samples, the teachers score and vLLM receives
the very same token ids.
"""

import torch

from opdplus.tools import format_tools_plain


def render_prompt(tokenizer, prompt) -> str:
    """The model-ready text for a prompt: a string (one user turn) or an Example (its messages and tools).

    With a chat template: the messages plus the assistant generation prompt; tools go through the template's
    own `tools` support when it has one, else they are described in a system message (plain format below).
    Without a chat template (base models), the documented plain format:

        <tools described by format_tools_plain, if any>

        user: <content>
        assistant:

    and a single user prompt without tools is passed unchanged, for the model to continue.
    """
    messages, tools = conversation(prompt)
    return render_conversation(tokenizer, messages, tools)


def conversation(prompt) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) of a prompt: a string is one user turn."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}], None
    messages = [dict(m) for m in prompt.messages] if prompt.messages else [{"role": "user", "content": prompt.prompt}]
    return messages, [dict(tool) for tool in prompt.tools] if prompt.tools else None


def render_conversation(tokenizer, messages: list[dict], tools: list[dict] | None, *,
                        add_generation_prompt: bool = True) -> str:
    """`render_prompt` for explicit messages; multi-turn rollouts render the conversation so far with it."""
    template = getattr(tokenizer, "chat_template", None)
    if template:
        options = {"add_generation_prompt": add_generation_prompt, "tokenize": False}
        if tools and "tools" in template:
            options["tools"] = tools
        elif tools:
            messages = [{"role": "system", "content": format_tools_plain(tools)}, *messages]
        try:
            return tokenizer.apply_chat_template(messages, **options)
        except Exception as error:  # jinja's TemplateError and friends: say which conversation failed
            roles = ",".join(message.get("role", "?") for message in messages)
            raise ValueError(f"the tokenizer's chat template cannot render this conversation (roles {roles}"
                             f"{', with tools' if tools else ''}): {error}") from None
    if tools is None and len(messages) == 1 and add_generation_prompt:
        return messages[0]["content"]
    lines = [format_tools_plain(tools), ""] if tools else []
    lines += [f"{message['role']}: {message['content']}" for message in messages]
    return "\n".join(lines + (["assistant:"] if add_generation_prompt else []))


def encode_prompts(tokenizer, prompts: list, max_prompt_length: int | None = None) -> list[list[int]]:
    """Token ids of each rendered prompt. The rendered template already holds any BOS or markers, so no
    special tokens are added; truncation keeps the end, next to the response."""
    texts = [render_prompt(tokenizer, prompt) for prompt in prompts]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    if max_prompt_length is not None:
        encoded = [ids[-max_prompt_length:] for ids in encoded]
    return encoded


def eos_token_ids(model, tokenizer) -> list[int]:
    """All ids that end a response: the tokenizer's EOS plus any the model's generation config lists."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids.update(configured if isinstance(configured, list) else [configured])
    ids.discard(None)
    if not ids:
        raise ValueError("the tokenizer has no EOS token, so responses could never end")
    return sorted(ids)


def pad_token_id(tokenizer, eos_ids: list[int]) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists to a common length: generation continues from the last column."""
    return _pad(sequences, pad_id, max(len(s) for s in sequences), left=True)


def right_pad(sequences: list[list[int]], pad_id: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists to `width` (default: the longest): responses start right after their prompts."""
    return _pad(sequences, pad_id, max(len(s) for s in sequences) if width is None else width, left=False)


def _pad(sequences: list[list[int]], pad_id: int, length: int, *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [N, length] filled with pad_id, mask [N, length] 1 on the real tokens)."""
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, tokens in enumerate(sequences):
        if tokens:
            where = slice(length - len(tokens), length) if left else slice(0, len(tokens))
            input_ids[row, where] = torch.tensor(tokens, dtype=torch.long)
            attention_mask[row, where] = 1
    return input_ids, attention_mask
