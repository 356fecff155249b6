"""A teacher in the training process: a Hugging Face causal LM, frozen, scoring the rollouts' padded tensors.

Rows go to the model in batches of `batch_size`; in a batch where several rows share a prompt (samples of one
prompt), each distinct prompt runs through the model once (`shared_prompt_logprobs`), otherwise the rows run
whole. Each batch is cut to its own longest prompt and response, so a row's scores do not depend on how long
the other batches' rows are.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from opdplus.logprobs import (head_logits, head_logprobs, predicting_states, shared_prompt_logprobs,
                              shared_prompt_states, token_logprobs)
from opdplus.teachers.distribution import DenseDistribution, TopKDistribution
from opdplus.models import load_model_and_tokenizer
from opdplus.teachers.vocab import check_same_vocabulary


class _TemperedHead(torch.nn.Module):
    """The LM head followed by the model's logit soft-cap (if any) and then division by the temperature,
    the order in which a sampler sees them."""

    def __init__(self, lm_head: torch.nn.Module, softcap: float | None, temperature: float):
        super().__init__()
        self.lm_head, self.softcap, self.temperature = lm_head, softcap, temperature
        self.weight = lm_head.weight  # token_logprobs sizes its chunks from weight.shape[0]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits / self.temperature


class _TemperedModel(torch.nn.Module):
    """Presents a model to `token_logprobs` with logits divided by a temperature.

    token_logprobs has no temperature argument; wrapping the head keeps its chunked path (no full logits).
    The soft-cap moves into the head, so the config this wrapper shows has none.
    """

    def __init__(self, model: torch.nn.Module, temperature: float):
        super().__init__()
        self.model = model
        softcap = getattr(model.config, "final_logit_softcapping", None)
        head = model.get_output_embeddings()
        self.head = _TemperedHead(head, softcap, temperature) if head is not None else None
        self.config = SimpleNamespace(final_logit_softcapping=None)
        self.temperature = temperature

    def get_decoder(self):
        return self.model.get_decoder()

    def get_output_embeddings(self):
        return self.head

    def forward(self, **inputs):  # used only by token_logprobs' full-logits fallback
        logits = self.model(**inputs).logits  # the model's own forward already applied any soft-cap
        return SimpleNamespace(logits=logits.float() / self.temperature)


class LocalTeacher:
    """A frozen causal LM in this process, scoring `batch_size` rows at a time."""

    def __init__(self, model, tokenizer, *, name: str = "local", device: str | torch.device = "cpu",
                 batch_size: int = 64, temperature: float = 1.0):
        if temperature <= 0:
            raise ValueError(f"teacher temperature must be positive, got {temperature}")
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer, self.name, self.device = tokenizer, name, torch.device(device)
        self.batch_size, self.temperature = batch_size, temperature
        self._scorer = self.model if temperature == 1.0 else _TemperedModel(self.model, temperature)
        # any id works as padding: padded positions are masked out and their log-probs are dropped
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    @classmethod
    def load(cls, spec: str, *, dtype: torch.dtype = torch.float32, **options) -> LocalTeacher:
        """From a local directory, a `tiny:` name or a Hub id."""
        model, tokenizer = load_model_and_tokenizer(spec, dtype=dtype)
        return cls(model, tokenizer, name=spec, **options)

    @torch.no_grad()
    def score(self, rollouts) -> torch.Tensor:
        """float32 [N, T] on `rollouts.input_ids.device`: log p of every real response token, 0 after its end."""
        prompt_length = rollouts.prompt_length  # P
        input_ids, attention_mask, prompt_lengths, response_lengths = self._prepare(rollouts)
        scores = torch.zeros(input_ids.shape[0], input_ids.shape[1] - prompt_length, dtype=torch.float32,
                             device=self.device)  # [N, T]
        todo = response_lengths.nonzero()[:, 0]  # rows with nothing to score never reach the model
        for begin in range(0, len(todo), self.batch_size):
            rows = todo[begin : begin + self.batch_size]
            batch = self._score_batch(input_ids[rows], attention_mask[rows], prompt_length, prompt_lengths[rows],
                                      response_lengths[rows])  # [B, longest response in the batch]
            scores[rows, : batch.shape[1]] = batch
        return scores.to(rollouts.input_ids.device)

    def _prepare(self, rollouts):
        """The rollouts on this teacher's device, padded with its pad id (any id would do: padded positions are
        masked out): ids and mask [N, P + T], prompt and response lengths [N]. Every row needs a prompt token."""
        prompt_length = rollouts.prompt_length  # P
        attention_mask = rollouts.attention_mask.to(self.device).long()  # [N, P + T]
        input_ids = rollouts.input_ids.to(self.device).masked_fill(attention_mask == 0, self.pad_id)  # [N, P + T]
        prompt_lengths = attention_mask[:, :prompt_length].sum(1)  # [N]
        response_lengths = attention_mask[:, prompt_length:].sum(1)  # [N]
        empty = (prompt_lengths == 0).nonzero()
        if len(empty):
            row = int(empty[0, 0])
            raise ValueError(f"sequence {row}: start must be in [1, {int(response_lengths[row])}] (its length), got 0")
        return input_ids, attention_mask, prompt_lengths, response_lengths

    def _moved_left(self, input_ids, prompt_length, prompt_lengths, response_lengths, width):
        """(each row's real tokens moved to the left, prompt then response, right-padded to `width` columns
        [B, width]; which of them are real [B, width])."""
        columns = torch.arange(width, device=input_ids.device)  # [L]
        real = columns < (prompt_lengths + response_lengths)[:, None]  # [B, L]
        source = (prompt_length - prompt_lengths)[:, None] + columns  # where each token sits in the rollout
        rows = input_ids.gather(1, source.clamp(max=input_ids.shape[1] - 1)).masked_fill(~real, self.pad_id)
        return rows, real

    def _score_batch(self, input_ids, attention_mask, prompt_length, prompt_lengths, response_lengths) -> torch.Tensor:
        first_rows, prompt_index = distinct_prompts(input_ids[:, :prompt_length], attention_mask[:, :prompt_length])
        if len(first_rows) < len(input_ids):  # several samples of one prompt: its prefix runs once for all of them
            prompt_columns = slice(prompt_length - int(prompt_lengths.max()), prompt_length)
            response_columns = slice(prompt_length, prompt_length + int(response_lengths.max()))
            response_mask = attention_mask[:, response_columns]  # [B, T_b]
            scores = shared_prompt_logprobs(
                self._scorer, input_ids[first_rows, prompt_columns], attention_mask[first_rows, prompt_columns],
                prompt_index, input_ids[:, response_columns], response_mask).float()
            return scores.masked_fill(response_mask == 0, 0.0)
        return self._score_whole_rows(input_ids, attention_mask, prompt_length, prompt_lengths, response_lengths)

    def _score_whole_rows(self, input_ids, attention_mask, prompt_length, prompt_lengths, response_lengths):
        """Each row's real tokens moved to the left (prompt then response, right-padded) and scored in one
        forward from the earliest response start; each row keeps its own window."""
        rows, real = self._moved_left(input_ids, prompt_length, prompt_lengths, response_lengths,
                                      int((prompt_lengths + response_lengths).max()))  # [B, L]
        start = int(prompt_lengths.min())
        scores = token_logprobs(self._scorer, rows, real.long(), start=start).float()  # [B, L - start]
        steps = torch.arange(int(response_lengths.max()), device=input_ids.device)  # [T_b]
        window = (prompt_lengths - start)[:, None] + steps  # row b's response starts at its prompt's end
        picked = scores.gather(1, window.clamp(max=scores.shape[1] - 1))  # [B, T_b]
        return picked.masked_fill(steps >= response_lengths[:, None], 0.0)

    @torch.no_grad()
    def distribution(self, rollouts, top_k: int | None = None) -> tuple[torch.Tensor, DenseDistribution | TopKDistribution]:
        """(log-probs [N, T] of the response tokens as `score` gives them, up to float rounding; the teacher's
        whole next-token distribution at every response position, or its `top_k` tokens)."""
        prompt_length, device = rollouts.prompt_length, rollouts.input_ids.device
        input_ids, attention_mask, prompt_lengths, response_lengths = self._prepare(rollouts)
        states = None  # [N, T, H], zeros after each row's end
        for begin in range(0, len(input_ids), self.batch_size):
            rows = torch.arange(begin, min(begin + self.batch_size, len(input_ids)), device=self.device)
            batch = self._states_batch(input_ids[rows], attention_mask[rows], prompt_length, prompt_lengths[rows],
                                       response_lengths[rows])  # [B, T_b, H]
            if states is None:
                states = batch.new_zeros(len(input_ids), input_ids.shape[1] - prompt_length, batch.shape[-1])
            states[rows, : batch.shape[1]] = batch
        dense = DenseDistribution(states, head_logits(self._scorer))
        scores = head_logprobs(self._scorer, states, input_ids[:, prompt_length:], logits_of=dense.logits_of)
        scores = scores.float().masked_fill(attention_mask[:, prompt_length:] == 0, 0.0).to(device)
        return scores, (dense if top_k is None else dense.top_k(top_k))

    def _states_batch(self, input_ids, attention_mask, prompt_length, prompt_lengths, response_lengths):
        """[B, T_b, H]: the states that predict each response token (padding positions hold junk)."""
        width = max(1, int(response_lengths.max()))
        first_rows, prompt_index = distinct_prompts(input_ids[:, :prompt_length], attention_mask[:, :prompt_length])
        if len(first_rows) < len(input_ids):
            prompt_columns = slice(prompt_length - int(prompt_lengths.max()), prompt_length)
            response_columns = slice(prompt_length, prompt_length + width)
            states = shared_prompt_states(self._scorer, input_ids[first_rows, prompt_columns],
                                          attention_mask[first_rows, prompt_columns], prompt_index,
                                          input_ids[:, response_columns], attention_mask[:, response_columns])
            if states is not None:
                return states
        rows, real = self._moved_left(input_ids, prompt_length, prompt_lengths, response_lengths,
                                      int((prompt_lengths + response_lengths).max()) + 1)  # a spare for empty rows
        start = int(prompt_lengths.min())
        states = predicting_states(self._scorer, rows, real.long(), start=start, share_prompts=False)
        if states is None:
            raise ValueError(f"teacher {self.name}: the dense and top-k estimators need a model with a separate "
                             "decoder body and LM head")
        window = (prompt_lengths - start)[:, None] + torch.arange(width, device=input_ids.device)  # [B, T_b]
        index = window.clamp(max=states.shape[1] - 1)[..., None].expand(-1, -1, states.shape[-1])
        return states.gather(1, index)

    def check_tokenizer(self, tokenizer) -> None:
        check_same_vocabulary(tokenizer, self.tokenizer)

    def close(self) -> None:
        pass


def distinct_prompts(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the first row of each distinct prompt [U], in order of appearance; each row's prompt in that order [B])
    for left-padded prompts [B, P] whose padding holds one and the same id."""
    unique, inverse = torch.unique(torch.cat([prompt_ids, prompt_mask], 1), dim=0, return_inverse=True)
    rows = torch.arange(len(prompt_ids), device=prompt_ids.device)
    first = torch.full((len(unique),), len(prompt_ids), device=prompt_ids.device).scatter_reduce(
        0, inverse, rows, "amin")  # [U] in torch.unique's sorted order
    order = first.argsort()
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(len(order), device=order.device))
    return first[order], rank[inverse]
