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


def head_logits(model: torch.nn.Module):
    """hidden [M, H] -> float32 logits [M, V]: the model's LM head with its logit soft-cap, if any."""
    lm_head, softcap = model.get_output_embeddings(), getattr(model.config, "final_logit_softcapping", None)

    def logits(hidden: Tensor) -> Tensor:
        values = lm_head(hidden).float()
        return torch.tanh(values / softcap) * softcap if softcap else values

    return logits


def _selected_logprobs(hidden: Tensor, targets: Tensor, logits_of) -> Tensor:
    logits = logits_of(hidden)  # [M, V] for one chunk only
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
    hidden = predicting_states(model, input_ids, attention_mask, start=start, share_prompts=share_prompts)
    if hidden is None:
        return _full_logits_logprobs(model, input_ids, attention_mask, position_ids_from_mask(attention_mask), start)
    return head_logprobs(model, hidden, input_ids[:, start:], max_logit_elements)


def predicting_states(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, *, start: int,
                      share_prompts: bool = True) -> Tensor | None:
    """[N, L - start, H]: the decoder's last states that predict input_ids[:, t] for t = start .. L-1 (the LM
    head's inputs), or None for a model without a separate decoder body and LM head."""
    if not 1 <= start < input_ids.shape[1]:
        raise ValueError(f"start must be in [1, {input_ids.shape[1] - 1}], got {start}")
    decoder, lm_head = model.get_decoder(), model.get_output_embeddings()
    if decoder is None or lm_head is None or decoder is model:
        return None
    if share_prompts and input_ids.shape[0] > 1:
        prompts = torch.cat([input_ids[:, :start], attention_mask[:, :start].to(input_ids.dtype)], 1)
        unique, prompt_index = torch.unique(prompts, dim=0, return_inverse=True)
        if unique.shape[0] < prompts.shape[0]:
            hidden = shared_prompt_states(model, unique[:, :start], unique[:, start:].to(attention_mask.dtype),
                                          prompt_index, input_ids[:, start:], attention_mask[:, start:])
            if hidden is not None:
                return hidden
    position_ids = position_ids_from_mask(attention_mask)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
    return hidden[:, start - 1 : -1]  # the state before token t predicts token t


def head_logprobs(model, hidden: Tensor, targets: Tensor, max_logit_elements: int = DEFAULT_MAX_LOGIT_ELEMENTS,
                  logits_of=None) -> Tensor:
    """[N, T] log-probs of `targets` from the decoder states [N, T, H] that predict them, chunk by chunk.
    logits_of: hidden -> float32 logits (default: the model's head, `head_logits`)."""
    logits_of = logits_of or head_logits(model)
    flat_hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    chunk = max(1, max_logit_elements // model.get_output_embeddings().weight.shape[0])
    pieces = []
    for begin in range(0, flat_targets.shape[0], chunk):
        args = (flat_hidden[begin : begin + chunk], flat_targets[begin : begin + chunk], logits_of)
        if torch.is_grad_enabled():
            pieces.append(checkpoint(_selected_logprobs, *args, use_reentrant=False))
        else:
            pieces.append(_selected_logprobs(*args))
    return torch.cat(pieces).view_as(targets)


def _logprobs_and_per_position(hidden, targets, logits_of, per_position, flat: slice) -> Tensor:
    logprobs = torch.log_softmax(logits_of(hidden), dim=-1)  # [M, V] for one chunk only
    return torch.stack([logprobs.gather(-1, targets[:, None]).squeeze(-1), per_position(logprobs, flat)], -1)


def head_logprobs_and_per_position(model, hidden: Tensor, targets: Tensor, per_position,
                                   max_logit_elements: int = DEFAULT_MAX_LOGIT_ELEMENTS) -> Tensor:
    """[N, T, 2]: the log-probs of `targets` (as `head_logprobs`) and a number per position computed from the
    whole next-token distribution, `per_position(logprobs [M, V], flat positions slice) -> [M]` (the dense and
    top-k divergences), chunk by chunk: under autograd each chunk is recomputed in the backward pass, so no
    [N, T, V] tensor is ever held. `flat` indexes the N * T positions in row-major order."""
    logits_of = head_logits(model)
    flat_hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    chunk = max(1, max_logit_elements // model.get_output_embeddings().weight.shape[0])
    pieces = []
    for begin in range(0, flat_targets.shape[0], chunk):
        flat = slice(begin, min(begin + chunk, flat_targets.shape[0]))
        args = (flat_hidden[flat], flat_targets[flat], logits_of, per_position, flat)
        pieces.append(checkpoint(_logprobs_and_per_position, *args, use_reentrant=False)
                      if torch.is_grad_enabled() else _logprobs_and_per_position(*args))
    return torch.cat(pieces).view(*targets.shape, 2)


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
    hidden = shared_prompt_states(model, prompt_ids, prompt_mask, prompt_index, response_ids, response_mask)
    if hidden is None:  # no KV cache (e.g. switched off) or no separate head
        rows = torch.cat([prompt_ids[prompt_index], response_ids], 1)
        mask = torch.cat([prompt_mask[prompt_index], response_mask.to(prompt_mask.dtype)], 1)
        return token_logprobs(model, rows, mask, start=prompt_ids.shape[1], max_logit_elements=max_logit_elements,
                              share_prompts=False)
    return head_logprobs(model, hidden, response_ids, max_logit_elements)


def shared_prompt_states(model: torch.nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, prompt_index: Tensor,
                         response_ids: Tensor, response_mask: Tensor) -> Tensor | None:
    """[N, T, H]: the states that predict each response token (as `predicting_states` of the concatenated rows),
    each distinct prompt run once; None when the model has no separate head or takes no KV cache."""
    decoder = model.get_decoder()
    cache_name = None
    if decoder is not None and decoder is not model and model.get_output_embeddings() is not None:
        cache_name = cache_argument(decoder)
    if cache_name is None:
        return None
    cache = DynamicCache(config=decoder.config)
    prompt_positions = position_ids_from_mask(prompt_mask)
    prefix = decoder(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=prompt_positions,
                     use_cache=True, **{cache_name: cache}).last_hidden_state  # [U, P, H]
    if cache.get_seq_length() != prompt_ids.shape[1]:  # the cache was not filled (e.g. switched off)
        return None
    cache.batch_select_indices(prompt_index)  # every row gets its prompt's keys and values: [N, heads, P, d]
    steps = torch.arange(response_ids.shape[1], device=response_ids.device)
    positions = prompt_positions[prompt_index, -1:] + 1 + steps  # [N, T], continuing each prompt
    mask = torch.cat([prompt_mask[prompt_index], response_mask.to(prompt_mask.dtype)], 1)  # [N, P + T]
    hidden = decoder(input_ids=response_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                     **{cache_name: cache}).last_hidden_state  # [N, T, H]
    # the state before token t predicts token t: the prompt's last state predicts the first response token
    return torch.cat([prefix[prompt_index, -1:], hidden[:, :-1]], 1)


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
