"""Log-probs of given token ids under a causal LM, without materialising [batch, length, vocab] logits.

The decoder body runs once; the LM head is then applied to chunks of positions, keeping only the sampled
token's logit and the logsumexp of each row. Under autograd every chunk is checkpointed, so its logits are
recomputed in the backward pass instead of being stored: peak memory is one chunk of logits, whatever the
vocabulary (real ones are ~150k).

Position ids are derived from the attention mask, as `generate` does for left-padded prompts: scoring with
plain 0..L-1 positions would give different log-probs from the ones the samples were drawn with.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

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
) -> Tensor:
    """float32 [N, L - start]: log p(input_ids[:, t] | input_ids[:, :t]) for t = start .. L-1.

    Gradients flow when called with grad enabled (the student); call under `torch.no_grad()` for a teacher.
    """
    if not 1 <= start < input_ids.shape[1]:
        raise ValueError(f"start must be in [1, {input_ids.shape[1] - 1}], got {start}")
    position_ids = position_ids_from_mask(attention_mask)
    decoder, lm_head = model.get_decoder(), model.get_output_embeddings()
    if decoder is None or lm_head is None or decoder is model:
        return _full_logits_logprobs(model, input_ids, attention_mask, position_ids, start)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
    # the state before token t predicts token t
    hidden = hidden[:, start - 1 : -1]  # [N, T, H]
    targets = input_ids[:, start:]  # [N, T]
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


def _full_logits_logprobs(model, input_ids, attention_mask, position_ids, start) -> Tensor:
    """Fallback for models that do not expose a decoder body and an LM head separately."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    logits = logits[:, start - 1 : -1].float()
    return logits.gather(-1, input_ids[:, start:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
