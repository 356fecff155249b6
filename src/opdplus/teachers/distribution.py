"""A teacher's next-token distribution at every response position, for the dense and top-k estimators.

The trainer asks for it one chunk of positions at a time (`support`), inside the student's chunked head, so that
neither model's [N, T, vocab] log-probs exist at once: the dense one keeps the teacher's last hidden states
[N, T, H] and applies its LM head per chunk; the top-k one holds K ids and log-probs per position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

# teacher logits computed at once when picking top-k: 2^24 float32 = 64 MiB
MAX_LOGIT_ELEMENTS = 2**24


@dataclass(frozen=True)
class TopKDistribution:
    """The teacher's K most likely tokens at each position: ids [N, T, K] and their log-probs [N, T, K]."""

    token_ids: Tensor
    logprobs: Tensor

    def rows(self, index) -> TopKDistribution:
        return TopKDistribution(self.token_ids[index], self.logprobs[index])

    def support(self, flat: slice, device: torch.device) -> tuple[Tensor, Tensor]:
        """(ids [M, K], log-probs [M, K]) at positions `flat` of the row-major [N * T] positions."""
        k = self.token_ids.shape[-1]
        return (self.token_ids.reshape(-1, k)[flat].to(device), self.logprobs.reshape(-1, k)[flat].to(device))


@dataclass(frozen=True)
class DenseDistribution:
    """The whole distribution: the teacher's last hidden states [N, T, H] and its head (hidden -> float32
    logits, soft-cap and temperature included)."""

    states: Tensor
    logits_of: Callable[[Tensor], Tensor]

    def rows(self, index) -> DenseDistribution:
        return DenseDistribution(self.states[index], self.logits_of)

    @torch.no_grad()
    def support(self, flat: slice, device: torch.device) -> tuple[None, Tensor]:
        """(None: the ids are 0 .. V-1, log-probs [M, V]) at positions `flat` of the row-major [N * T]."""
        states = self.states.reshape(-1, self.states.shape[-1])[flat]
        return None, torch.log_softmax(self.logits_of(states), dim=-1).to(device)

    @torch.no_grad()
    def top_k(self, k: int) -> TopKDistribution:
        """The K most likely tokens at each position, computed a chunk of positions at a time."""
        flat_states = self.states.reshape(-1, self.states.shape[-1])
        vocab = self.logits_of(flat_states[:1]).shape[-1]
        if not 1 <= k < vocab:
            raise ValueError(f"--estimator topk:{k}: K must be in [1, {vocab - 1}] (the teacher's vocabulary has "
                             f"{vocab} tokens; use --estimator dense for all of them)")
        chunk = max(1, MAX_LOGIT_ELEMENTS // vocab)
        ids, values = [], []
        for begin in range(0, flat_states.shape[0], chunk):
            logprobs = torch.log_softmax(self.logits_of(flat_states[begin : begin + chunk]), dim=-1)
            top = logprobs.topk(k, dim=-1)
            ids.append(top.indices)
            values.append(top.values)
        shape = (*self.states.shape[:-1], k)
        return TopKDistribution(torch.cat(ids).view(shape), torch.cat(values).view(shape))
