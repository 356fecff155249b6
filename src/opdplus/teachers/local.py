"""A teacher in the training process: a Hugging Face causal LM, frozen, scored through `token_logprobs`."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from opdplus.logprobs import shared_prompt_logprobs, token_logprobs
from opdplus.rollout import left_pad, right_pad
from opdplus.teachers.base import resolve_starts
from opdplus.tiny.models import load_model_and_tokenizer
from opdplus.vocab import check_same_vocabulary


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
    """A frozen causal LM in this process. Sequences are right-padded into batches of `batch_size`."""

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
    def token_logprobs(self, sequences: list[list[int]], start: list[int] | None = None) -> list[torch.Tensor]:
        starts = resolve_starts(sequences, start)
        results: list[torch.Tensor] = [torch.zeros(0)] * len(sequences)
        # sequences with nothing to score (start == len) never reach the model
        todo = [i for i in range(len(sequences)) if starts[i] < len(sequences[i])]
        for begin in range(0, len(todo), self.batch_size):
            batch = todo[begin : begin + self.batch_size]
            for i, scores in zip(batch, self._score_batch([sequences[i] for i in batch], [starts[i] for i in batch])):
                results[i] = scores
        return results

    def _score_batch(self, sequences: list[list[int]], starts: list[int]) -> list[torch.Tensor]:
        prompts: dict[tuple[int, ...], int] = {}
        prompt_index = [prompts.setdefault(tuple(ids[:begin]), len(prompts)) for ids, begin in zip(sequences, starts)]
        if len(prompts) < len(sequences):  # several samples of one prompt: its prefix runs once for all of them
            return self._score_shared_prompts(sequences, starts, list(prompts), prompt_index)
        input_ids, attention_mask = right_pad(sequences, self.pad_id)
        # one forward from the earliest start; each row keeps its own window
        batch_start = min(starts)
        scores = token_logprobs(self._scorer, input_ids.to(self.device), attention_mask.to(self.device),
                                start=batch_start).float().cpu()
        return [scores[row, begin - batch_start : len(ids) - batch_start]
                for row, (ids, begin) in enumerate(zip(sequences, starts))]

    def _score_shared_prompts(self, sequences, starts, prompts, prompt_index) -> list[torch.Tensor]:
        prompt_ids, prompt_mask = left_pad(prompts, self.pad_id)  # as the prompts were sampled from
        response_ids, response_mask = right_pad([ids[begin:] for ids, begin in zip(sequences, starts)], self.pad_id)
        scores = shared_prompt_logprobs(self._scorer, *(t.to(self.device) for t in (
            prompt_ids, prompt_mask, torch.tensor(prompt_index), response_ids, response_mask))).float().cpu()
        return [scores[row, : len(ids) - begin] for row, (ids, begin) in enumerate(zip(sequences, starts))]

    def check_tokenizer(self, tokenizer) -> None:
        check_same_vocabulary(tokenizer, self.tokenizer)

    def close(self) -> None:
        pass
