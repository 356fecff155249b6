"""Log-probs of given token ids under a causal LM, without materialising [batch, length, vocab] logits.

The decoder body runs once; the LM head is then applied to chunks of positions, keeping only the sampled
token's logit and the logsumexp of each row. Under autograd every chunk is checkpointed, so its logits are
recomputed in the backward pass instead of being stored: peak memory is one chunk of logits, whatever the
vocabulary (real ones are ~150k).

Position ids are derived from the attention mask, as `generate` does for left-padded prompts: scoring with
plain 0..L-1 positions would give different log-probs from the ones the samples were drawn with.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache

# logits elements computed at once: 2^24 float32 = 64 MiB, e.g. 110 tokens of a 151,936-token vocabulary
DEFAULT_MAX_LOGIT_ELEMENTS = 2**24


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """0, 1, 2, ... over the real tokens of each row (left padding gets position 0, as in `generate`)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _selected_logprobs(hidden: Tensor, targets: Tensor, lm_head: torch.nn.Module, softcap: float | None) -> Tensor:
    logits = lm_head(hidden).float()  # [M, V] for one chunk only
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def token_logprobs(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    start: int,
    max_logit_elements: int = DEFAULT_MAX_LOGIT_ELEMENTS,
    share_prompts: bool = True,
) -> Tensor:
    """float32 [N, L - start]: log p(input_ids[:, t] | input_ids[:, :t]) for t = start .. L-1.

    Gradients flow when called with grad enabled (the student); call under `torch.no_grad()` for a teacher.
    With `share_prompts`, rows whose first `start` columns (ids and mask) are equal, e.g. several samples of one
    prompt, run those columns through the model once (`shared_prompt_logprobs`).
    """
    if not 1 <= start < input_ids.shape[1]:
        raise ValueError(f"start must be in [1, {input_ids.shape[1] - 1}], got {start}")
    position_ids = position_ids_from_mask(attention_mask)
    decoder, lm_head = model.get_decoder(), model.get_output_embeddings()
    if decoder is None or lm_head is None or decoder is model:
        return _full_logits_logprobs(model, input_ids, attention_mask, position_ids, start)
    if share_prompts and input_ids.shape[0] > 1:
        prompts = torch.cat([input_ids[:, :start], attention_mask[:, :start].to(input_ids.dtype)], 1)
        unique, prompt_index = torch.unique(prompts, dim=0, return_inverse=True)
        if unique.shape[0] < prompts.shape[0]:
            return shared_prompt_logprobs(model, unique[:, :start], unique[:, start:].to(attention_mask.dtype),
                                          prompt_index, input_ids[:, start:], attention_mask[:, start:],
                                          max_logit_elements=max_logit_elements)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
    # the state before token t predicts token t
    return _head_logprobs(model, hidden[:, start - 1 : -1], input_ids[:, start:], max_logit_elements)


def _head_logprobs(model, hidden: Tensor, targets: Tensor, max_logit_elements: int) -> Tensor:
    """[N, T] log-probs of `targets` from the decoder states [N, T, H] that predict them, chunk by chunk."""
    lm_head = model.get_output_embeddings()
    flat_hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    chunk = max(1, max_logit_elements // lm_head.weight.shape[0])
    pieces = []
    for begin in range(0, flat_targets.shape[0], chunk):
        args = (flat_hidden[begin : begin + chunk], flat_targets[begin : begin + chunk], lm_head, softcap)
        if torch.is_grad_enabled():
            pieces.append(checkpoint(_selected_logprobs, *args, use_reentrant=False))
        else:
            pieces.append(_selected_logprobs(*args))
    return torch.cat(pieces).view_as(targets)


def shared_prompt_logprobs(
    model: torch.nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    prompt_index: Tensor,
    response_ids: Tensor,
    response_mask: Tensor,
    *,
    max_logit_elements: int = DEFAULT_MAX_LOGIT_ELEMENTS,
) -> Tensor:
    """float32 [N, T]: log p(response_ids[n, t] | prompt prompt_index[n], response_ids[n, :t]), as
    `token_logprobs` gives them for the concatenated rows, with each distinct prompt run through the model once.

    prompt_ids, prompt_mask: [U, P], left-padded, U distinct prompts; prompt_index: [N] ids in [0, U);
    response_ids, response_mask: [N, T], right-padded. With k samples per prompt the prompts' share of the
    forward pass shrinks k-fold: their keys and values are computed for U rows and then gathered for N. For
    models without a separate decoder body and LM head, or a KV cache, the rows are scored whole instead.
    """
    decoder = model.get_decoder()
    cache_name = None
    if decoder is not None and decoder is not model and model.get_output_embeddings() is not None:
        cache_name = cache_argument(decoder)
    cache = DynamicCache(config=decoder.config) if cache_name else None
    prompt_positions = position_ids_from_mask(prompt_mask)
    if cache is not None:
        prefix = decoder(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=prompt_positions,
                         use_cache=True, **{cache_name: cache}).last_hidden_state  # [U, P, H]
    if cache is None or cache.get_seq_length() != prompt_ids.shape[1]:  # no KV cache (e.g. switched off)
        rows = torch.cat([prompt_ids[prompt_index], response_ids], 1)
        mask = torch.cat([prompt_mask[prompt_index], response_mask.to(prompt_mask.dtype)], 1)
        return token_logprobs(model, rows, mask, start=prompt_ids.shape[1], max_logit_elements=max_logit_elements,
                              share_prompts=False)
    cache.batch_select_indices(prompt_index)  # every row gets its prompt's keys and values: [N, heads, P, d]
    steps = torch.arange(response_ids.shape[1], device=response_ids.device)
    positions = prompt_positions[prompt_index, -1:] + 1 + steps  # [N, T], continuing each prompt
    mask = torch.cat([prompt_mask[prompt_index], response_mask.to(prompt_mask.dtype)], 1)  # [N, P + T]
    hidden = decoder(input_ids=response_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                     **{cache_name: cache}).last_hidden_state  # [N, T, H]
    # the state before token t predicts token t: the prompt's last state predicts the first response token
    hidden = torch.cat([prefix[prompt_index, -1:], hidden[:, :-1]], 1)
    return _head_logprobs(model, hidden, response_ids, max_logit_elements)


def cache_argument(module: torch.nn.Module) -> str | None:
    """The name under which `module.forward` takes a KV cache ("cache" since transformers 5.x, before that
    "past_key_values"), or None when it takes none."""
    parameters = inspect.signature(module.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def _full_logits_logprobs(model, input_ids, attention_mask, position_ids, start) -> Tensor:
    """Fallback for models that do not expose a decoder body and an LM head separately."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    logits = logits[:, start - 1 : -1].float()
    return logits.gather(-1, input_ids[:, start:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
