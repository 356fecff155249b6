"""Multi-turn rollouts with tools: the model calls the task's tools, reads their results, and goes on.

    for turn in 1..max_turns:
        every unfinished row samples one assistant turn (through its end-of-turn token, exact on-policy)
        a turn that ends cleanly and parses as tool calls (json / ast only, nothing executed) gets the
        results of the task's own functions for those calls, rendered by the chat template as tool
        messages plus the next assistant prompt; other rows are done

Each row becomes one token sequence, prompt + [turn, tool results, turn, ...]. The tool-result tokens are
in the attention mask (the student and the teacher both read them: the teacher scores every later token
given the same results) but not in the response mask, so they get no loss and pass no credit in the
advantage sums (opdplus.advantages skips masked positions). The sampled tokens are kept as sampled; only
the environment's text is tokenized, and teacher and student see the same ids.
"""

from __future__ import annotations

import torch

from opdplus.rollout import (
    Rollouts,
    conversation,
    encode_prompts,
    eos_token_ids,
    generate_responses,
    left_pad,
    pad_token_id,
    render_conversation,
    right_pad,
    sample,
    warn_if_off_policy,
)
from opdplus.tasks.tooluse import parse_calls
from opdplus.tools import ToolBox


def sample_with_tools(model, tokenizer, examples: list, toolbox: ToolBox, *, max_turns: int, num_samples: int = 1,
                      max_new_tokens: int, greedy: bool = False, temperature: float = 1.0, top_k: int | None = 0,
                      top_p: float = 1.0) -> Rollouts:
    """Like `opdplus.rollout.sample`, with up to `max_turns` assistant turns per row; `max_new_tokens` is
    per turn. `completions` are the last assistant turns, `transcripts` the messages after the prompt."""
    warn_if_off_policy(greedy, temperature, top_k, top_p)
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = pad_token_id(tokenizer, eos_ids)
    eos_text = tokenizer.decode(eos_ids[:1])
    prompt_index = [i for i in range(len(examples)) for _ in range(num_samples)]
    unique = encode_prompts(tokenizer, examples)
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


def sample_for_task(model, tokenizer, task, examples: list, **options) -> Rollouts:
    """`opdplus.rollout.sample`, or `sample_with_tools` when the task gives the model tools to call."""
    toolbox = getattr(task, "toolbox", None)
    if toolbox is None:
        return sample(model, tokenizer, examples, **options)
    return sample_with_tools(model, tokenizer, examples, toolbox, max_turns=task.max_turns, **options)
