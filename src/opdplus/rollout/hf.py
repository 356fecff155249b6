"""The HF engine: the training model samples its own rollouts, single-turn or multi-turn with tools.

Single-turn: each prompt gets `num_samples` responses through their first EOS.

Multi-turn, when the task gives the model tools:

    for turn in 1..max_turns:
        every unfinished row samples one assistant turn (through its end-of-turn token, exact on-policy)
        a turn that ends cleanly and parses as tool calls (json / ast only, nothing executed) gets the
        results of the task's own functions for those calls, rendered by the chat template as tool
        messages plus the next assistant prompt; other rows are done

Each row becomes one token sequence, prompt + [turn, tool results, turn, ...]. The tool-result tokens are
in the attention mask (the student and the teacher both read them: the teacher scores every later token
given the same results) but not in the response mask, so they get no loss and pass no credit in the
advantage sums (opdplus.objective.advantages skips masked positions). The sampled tokens are kept as sampled;
only the environment's text is tokenized, and teacher and student see the same ids.
"""

from __future__ import annotations

import torch

from opdplus.rollout.prompts import (
    conversation,
    encode_prompts,
    eos_token_ids,
    left_pad,
    pad_token_id,
    render_conversation,
    right_pad,
)
from opdplus.rollout.responses import generate_responses, warn_if_off_policy
from opdplus.rollout.rollouts import Rollouts
from opdplus.tools import ToolBox, parse_calls


class HFEngine:
    """Samples with the model it holds: at temperature 1, no top-k, no top-p, y ~ p_θ exactly; `greedy`
    decodes the most likely tokens instead (evaluation). With a `toolbox`, rollouts run up to `max_turns`
    assistant turns."""

    def __init__(self, model, tokenizer, *, toolbox: ToolBox | None = None, max_turns: int = 1,
                 greedy: bool = False, temperature: float = 1.0, top_k: int | None = 0, top_p: float = 1.0,
                 max_prompt_length: int | None = None):
        self.model, self.tokenizer, self.toolbox, self.max_turns = model, tokenizer, toolbox, max_turns
        self.sampling = {"greedy": greedy, "temperature": temperature, "top_k": top_k, "top_p": top_p,
                         "max_prompt_length": max_prompt_length}

    def generate(self, examples: list, *, num_samples: int, max_new_tokens: int) -> Rollouts:
        """`num_samples` rollouts per example (strings or Examples), rows grouped: example 0's first."""
        if self.toolbox is None:
            return sample(self.model, self.tokenizer, examples, num_samples=num_samples,
                          max_new_tokens=max_new_tokens, **self.sampling)
        return sample_with_tools(self.model, self.tokenizer, examples, self.toolbox, max_turns=self.max_turns,
                                 num_samples=num_samples, max_new_tokens=max_new_tokens, **self.sampling)

    def sync_weights(self, model) -> None:
        self.model = model  # the training model samples itself: nothing to copy


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


def sample_with_tools(model, tokenizer, examples: list, toolbox: ToolBox, *, max_turns: int, num_samples: int = 1,
                      max_new_tokens: int, greedy: bool = False, temperature: float = 1.0, top_k: int | None = 0,
                      top_p: float = 1.0, max_prompt_length: int | None = None) -> Rollouts:
    """Like `sample`, with up to `max_turns` assistant turns per row; `max_new_tokens` is per turn.
    `completions` are the last assistant turns, `transcripts` the messages after the prompt."""
    warn_if_off_policy(greedy, temperature, top_k, top_p)
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = pad_token_id(tokenizer, eos_ids)
    eos_text = tokenizer.decode(eos_ids[:1])
    prompt_index = [i for i in range(len(examples)) for _ in range(num_samples)]
    unique = encode_prompts(tokenizer, examples, max_prompt_length)
    prompts = [unique[i] for i in prompt_index]
    rows = len(prompts)
    response = [[] for _ in range(rows)]  # token ids after the prompt
    sampled = [[] for _ in range(rows)]  # per response token: did the model sample it?
    transcripts: list[list[dict]] = [[] for _ in range(rows)]
    active = list(range(rows))
    for turn in range(max_turns):
        *_, turn_ids, turn_mask = generate_responses(
            model, [prompts[row] + response[row] for row in active], max_new_tokens=max_new_tokens, eos_ids=eos_ids,
            pad_id=pad_id, greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p)
        still_active = []
        for row, ids, keep in zip(active, turn_ids.cpu(), turn_mask.cpu()):
            tokens = ids[keep].tolist()
            response[row] += tokens
            sampled[row] += [True] * len(tokens)
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            transcripts[row].append({"role": "assistant", "content": text})
            ended = bool(tokens) and tokens[-1] in eos_ids  # a turn cut by max_new_tokens ends the rollout
            calls = parse_calls(text) if ended and turn + 1 < max_turns else None
            if not calls:
                continue
            results = [{"role": "tool", "name": str(call["name"]), "content": toolbox.call(call["name"], call["arguments"])}
                       for call in calls]
            messages, tools = conversation(examples[prompt_index[row]])
            environment = tool_results_text(tokenizer, messages + transcripts[row][:-1], tools or toolbox.schemas,
                                            text, results, eos_text)
            environment_ids = tokenizer(environment, add_special_tokens=False)["input_ids"]
            response[row] += environment_ids
            sampled[row] += [False] * len(environment_ids)
            transcripts[row] += results
            still_active.append(row)
        active = still_active
        if not active:
            break

    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    response_ids, response_real = right_pad(response, pad_id)  # real: sampled tokens and tool results
    response_mask = right_pad([[int(flag) for flag in flags] for flags in sampled], 0)[0].bool()  # sampled only
    device = next(model.parameters()).device
    return Rollouts(
        input_ids=torch.cat([prompt_ids, response_ids], dim=1).to(device),
        attention_mask=torch.cat([prompt_mask, response_real], dim=1).to(device),
        prompt_length=prompt_ids.shape[1],
        response_mask=response_mask.to(device),
        completions=[messages[-1]["content"] for messages in transcripts],
        prompt_index=prompt_index,
        transcripts=transcripts,
    )


def tool_results_text(tokenizer, history: list[dict], tools: list[dict] | None, assistant_text: str,
                      results: list[dict], eos_text: str) -> str:
    """What the environment appends after an assistant turn that ended with the model's EOS token: the rest
    of that turn's closing as the chat template writes it (e.g. a newline after <|im_end|>), the tool
    messages, and the next assistant prompt. Rendered by the same template as the prompt, so a multi-turn
    rollout reads exactly like the conversation rendered in one piece."""
    assistant = {"role": "assistant", "content": assistant_text}
    before = render_conversation(tokenizer, history + [assistant], tools, add_generation_prompt=False)
    after = render_conversation(tokenizer, history + [assistant] + results, tools, add_generation_prompt=True)
    if not after.startswith(before):
        raise ValueError("the chat template renders an assistant turn differently once tool messages follow it, "
                         "so tool results cannot be appended to the sampled tokens; use a template that does not")
    content_end = before.rfind(assistant_text.strip())
    closing = before[content_end + len(assistant_text.strip()) :] if content_end >= 0 else ""
    if eos_text and closing.startswith(eos_text):  # the model already emitted the end-of-turn token itself
        closing = closing[len(eos_text) :]
    return closing + after[len(before) :]
