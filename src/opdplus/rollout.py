"""Sampling responses from a policy, plus evaluation.

On-policy distillation needs samples y ~ p_θ(·|x) from the *unmodified* policy: any
temperature, top-k or top-p changes the sampling distribution, and the advantages
computed from those samples would then be for a different distribution. Exact sampling
(and greedy decoding) runs opdplus.sampler's KV-cache loop, which has no such options at all.
Only when a user asks for a modified distribution does HF `generate` run, and then with
every sampling parameter passed explicitly: it silently applies top_k=50 otherwise.
"""

import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from opdplus.sampler import generate as exact_generate


@dataclass
class Rollouts:
    input_ids: torch.LongTensor  # [N, P+T] prompts left-padded to P, responses right-padded to T with pad id
    attention_mask: torch.LongTensor  # [N, P+T] 1 on real tokens: the prompt, then the response through its end
    prompt_length: int  # P
    # [N, T] the tokens the model sampled, through the first EOS: the loss mask. In a multi-turn rollout the
    # response also holds tool results (attention 1, response_mask 0): scored in context, never trained on.
    response_mask: torch.BoolTensor
    completions: list[str]  # decoded responses without special tokens (multi-turn: the last assistant turn)
    prompt_index: list[int]  # which prompt each row came from
    transcripts: list[list[dict]] | None = None  # multi-turn: each row's assistant and tool messages

    @property
    def response_ids(self) -> torch.LongTensor:
        return self.input_ids[:, self.prompt_length :]

    @classmethod
    def single_turn(cls, tokenizer, prompt_ids, prompt_mask, response_ids, response_mask, prompt_index, **extra):
        """One sampled response per row: attention over the prompt and the response through its first EOS."""
        completions = [tokenizer.decode(row[keep], skip_special_tokens=True)
                       for row, keep in zip(response_ids.cpu(), response_mask.cpu())]
        return cls(input_ids=torch.cat([prompt_ids, response_ids], dim=1),
                   attention_mask=torch.cat([prompt_mask, response_mask.long()], dim=1),
                   prompt_length=prompt_ids.shape[1], response_mask=response_mask, completions=completions,
                   prompt_index=prompt_index, **extra)


@contextmanager
def eval_mode(model):
    """Temporarily switch off dropout etc. (samples must come from p_θ itself), then restore the mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


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
            messages = [{"role": "system", "content": _plain_tools(tools)}, *messages]
        try:
            return tokenizer.apply_chat_template(messages, **options)
        except Exception as error:  # jinja's TemplateError and friends: say which conversation failed
            roles = ",".join(message.get("role", "?") for message in messages)
            raise ValueError(f"the tokenizer's chat template cannot render this conversation (roles {roles}"
                             f"{', with tools' if tools else ''}): {error}") from None
    if tools is None and len(messages) == 1 and add_generation_prompt:
        return messages[0]["content"]
    lines = [_plain_tools(tools), ""] if tools else []
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


def _plain_tools(tools: list[dict]) -> str:
    from opdplus.tasks.tooluse import format_tools_plain

    return format_tools_plain(tools)


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


def mask_through_first_eos(response_ids: torch.Tensor, eos_ids: list[int]) -> torch.BoolTensor:
    """True up to and including the first EOS of each row (all True if a row has no EOS).

    Computed from EOS positions, never from pad ids: when pad == eos the final EOS must stay in the loss.
    """
    is_eos = torch.isin(response_ids, torch.tensor(eos_ids, device=response_ids.device))
    eos_seen_before = (torch.cumsum(is_eos.long(), dim=1) - is_eos.long()) > 0
    return ~eos_seen_before


def sample(
    model,
    tokenizer,
    prompts: list,  # strings (one user turn each) or Examples (messages, tools)
    *,
    num_samples: int = 1,
    max_new_tokens: int,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int | None = 0,
    top_p: float = 1.0,
    max_prompt_length: int | None = None,
) -> Rollouts:
    """Sample `num_samples` responses per prompt (rows are grouped: prompt 0's samples first).

    `max_prompt_length` truncates prompts on the left, keeping the end next to the response.
    """
    warn_if_off_policy(greedy, temperature, top_k, top_p)
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = pad_token_id(tokenizer, eos_ids)
    prompt_index = [i for i in range(len(prompts)) for _ in range(num_samples)]
    unique = encode_prompts(tokenizer, prompts, max_prompt_length)  # each prompt rendered once
    prompt_ids, prompt_mask, response_ids, response_mask = generate_responses(
        model, [unique[i] for i in prompt_index], max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id,
        greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p)
    return Rollouts.single_turn(tokenizer, prompt_ids, prompt_mask, response_ids, response_mask, prompt_index)


def warn_if_off_policy(greedy: bool, temperature: float, top_k: int | None, top_p: float) -> None:
    if not greedy and (temperature != 1.0 or (top_k or 0) != 0 or top_p < 1.0):
        warnings.warn(
            f"sampling with temperature={temperature}, top_k={top_k}, top_p={top_p}: "
            "samples are then not from p_θ, so on-policy estimates are biased",
            stacklevel=3,
        )


def pad_token_id(tokenizer, eos_ids: list[int]) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]


def generate_responses(model, prompts: list[list[int]], *, max_new_tokens: int, eos_ids: list[int], pad_id: int,
                       greedy: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """One response per token-id prompt: (prompt_ids [N, P] left-padded, prompt_mask [N, P],
    response_ids [N, T] pad after the first EOS, response_mask [N, T] through the first EOS)."""
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = (t.to(device) for t in left_pad(prompts, pad_id))
    with eval_mode(model):
        if greedy or (temperature == 1.0 and not top_k and top_p >= 1.0):  # exact p_θ: our lean KV-cache loop
            output = exact_generate(model, prompt_ids, prompt_mask, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                                    pad_id=pad_id, greedy=greedy)
        else:  # the user asked for a modified distribution: HF's logits processors provide it
            output = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=max_new_tokens,
                                    pad_token_id=pad_id, eos_token_id=eos_ids, do_sample=True,
                                    temperature=temperature, top_k=top_k or 0, top_p=top_p)
    # (generate runs under no_grad itself; the mask arithmetic below needs no graph either.)
    response_ids = output[:, prompt_ids.shape[1] :]
    response_mask = mask_through_first_eos(response_ids, eos_ids)
    response_ids = response_ids.masked_fill(~response_mask, pad_id)  # generate pads finished rows; make it explicit
    return prompt_ids, prompt_mask, response_ids, response_mask


@torch.no_grad()
def evaluate(model, tokenizer, task, examples, *, k: int = 0, batch_size: int = 256) -> dict:
    """Greedy accuracy, and avg@k (mean correctness of k temperature-1 samples per prompt) if k > 0."""
    from opdplus.toolloop import sample_for_task  # multi-turn rollouts build on this module

    with eval_mode(model):
        greedy_correct, sampled_correct = [], []
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            prompts = list(batch)
            rollouts = sample_for_task(model, tokenizer, task, prompts, max_new_tokens=task.max_new_tokens, greedy=True)
            greedy_correct += [task.verify(c, batch[i]) for c, i in zip(rollouts.completions, rollouts.prompt_index)]
            if k > 0:
                # Chunk so that batch_size bounds the number of rows generated at once.
                per_chunk = max(1, batch_size // k)
                for chunk_start in range(0, len(batch), per_chunk):
                    chunk = batch[chunk_start : chunk_start + per_chunk]
                    rollouts = sample_for_task(
                        model, tokenizer, task, list(chunk), num_samples=k, max_new_tokens=task.max_new_tokens
                    )
                    sampled_correct += [task.verify(c, chunk[i]) for c, i in zip(rollouts.completions, rollouts.prompt_index)]
    return {
        "greedy_accuracy": sum(greedy_correct) / max(len(greedy_correct), 1),
        "avg_at_k": sum(sampled_correct) / len(sampled_correct) if k > 0 else None,
    }
