"""A teacher with another tokenizer or another prompt than the student's (issue 17).

The teacher reads each row's prompt rendered by its own chat template (with an optional teacher-only
"privileged" system prompt) and the student's response in its own token ids. How the response reaches it depends
on how the two vocabularies relate (`vocab_relation`):

* "same": the student's ids as they are; only the prompt is the teacher's.
* "mapped": every student token is a teacher token of the same text under another id; ids go through a table.
  Both give token-level scores [N, T], exactly what a teacher reading the student's ids would give.
* "spans": the response text is re-tokenized by the teacher and both tokenizations are split into aligned spans
  (`opdplus.teachers.spans.align`); the teacher's log-prob of each span (the sum over its own tokens) comes back
  as `SpanScores` for the span-level loss.

System prompt: a leading system message; a template that refuses (or drops) the system role gets the text at the
start of the first user message instead, followed by a blank line. Multi-turn rollouts are refused: their tool
turns would have to be rendered by each model's own template.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from opdplus.objective.spans import SpanScores, span_ids_from_spans, sum_by_span
from opdplus.rollout.prompts import conversation, left_pad, render_conversation, right_pad
from opdplus.teachers.base import TokenRows
from opdplus.teachers.spans import align, plain_backend
from opdplus.teachers.vocab import check_same_vocabulary, probe_strings

def vocab_relation(student_tokenizer, teacher_tokenizer) -> str:
    """"same" (one vocabulary), "mapped" (every student token is a teacher token of the same text, the student's
    EOS pairs with the teacher's EOS) or "spans" (anything else: the teacher re-tokenizes the text)."""
    return _relation(student_tokenizer, teacher_tokenizer)[0]


def _relation(student_tokenizer, teacher_tokenizer) -> tuple[str, torch.Tensor | None]:
    try:
        check_same_vocabulary(student_tokenizer, teacher_tokenizer)
        return "same", None
    except ValueError:
        pass
    table = id_table(student_tokenizer, teacher_tokenizer)
    return ("mapped", table) if table is not None else ("spans", None)


def id_table(student_tokenizer, teacher_tokenizer) -> torch.Tensor | None:
    """int64 [largest student id + 1]: the teacher id of each student id (-1 where the student has no token), or
    None unless the two are one tokenizer under other ids: the same number of tokens, every student token a
    distinct teacher token that decodes to the same text, and texts tokenized alike (probe texts). The student's EOS
    pairs with the teacher's EOS whatever their texts (each model's own end of turn).

    A teacher whose vocabulary merely contains the student's tokens (a BPE teacher has every character of a
    character-level student) is not "mapped": it would score tokenizations it never saw in training, so it
    re-tokenizes ("spans")."""
    student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    student_eos, teacher_eos = student_tokenizer.eos_token_id, teacher_tokenizer.eos_token_id
    if (student_eos is not None and teacher_eos is None) or len(student_vocab) != len(teacher_vocab):
        return None
    pairs = {student_id: teacher_vocab.get(token) for token, student_id in student_vocab.items()}
    if student_eos is not None:
        pairs[student_eos] = teacher_eos
    if None in pairs.values() or len(set(pairs.values())) != len(pairs):
        return None
    by_text = [student_id for student_id in pairs if student_id != student_eos]
    if _token_texts(student_tokenizer, by_text) != _token_texts(teacher_tokenizer, [pairs[i] for i in by_text]):
        return None
    table = torch.full((max(pairs) + 1,), -1, dtype=torch.long)
    table[torch.tensor(list(pairs), dtype=torch.long)] = torch.tensor(list(pairs.values()), dtype=torch.long)
    for text in probe_strings(student_tokenizer):
        student_ids = student_tokenizer.encode(text, add_special_tokens=False)
        if table[torch.tensor(student_ids, dtype=torch.long)].tolist() != teacher_tokenizer.encode(
                text, add_special_tokens=False):
            return None
    return table


def _token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Each id decoded alone (special tokens kept). The Rust backend decodes in one batch call (a 152k vocabulary
    in well under a second); a tokenizer that cleans up spaces after decoding goes through its own decode."""
    backend = plain_backend(tokenizer)
    if backend is not None:
        return backend.decode_batch([[token_id] for token_id in ids], skip_special_tokens=False)
    return [tokenizer.decode([token_id], skip_special_tokens=False) for token_id in ids]


def select_rows(rollouts, rows: list[int]) -> SimpleNamespace:
    """These rows of `rollouts` with what a re-tokenizing teacher reads beyond `TokenRows`: the response mask
    (the sampled tokens) and the transcripts (to refuse multi-turn rows)."""
    picked = TokenRows.select(rollouts, rows)
    index = torch.tensor(rows, device=rollouts.input_ids.device)
    transcripts = getattr(rollouts, "transcripts", None)
    return SimpleNamespace(input_ids=picked.input_ids, attention_mask=picked.attention_mask,
                           prompt_length=picked.prompt_length, response_mask=response_mask(rollouts)[index],
                           transcripts=None if transcripts is None else [transcripts[row] for row in rows])


def response_mask(rollouts) -> torch.Tensor:
    """bool [N, T]: the rollouts' response mask, or the attention over the response for bare `TokenRows`."""
    mask = getattr(rollouts, "response_mask", None)
    return (rollouts.attention_mask[:, rollouts.prompt_length:] if mask is None else mask).bool()


class RetokenizingTeacher:
    """Any teacher (`inner`, scoring `TokenRows` in its own ids) behind its own tokenizer and prompt rendering.

    `score(rollouts, prompts)` needs each row's prompt (an Example or a string) because the teacher renders it
    itself; it returns [N, T] in modes "same" and "mapped", `SpanScores` in mode "spans".
    """

    def __init__(self, inner, tokenizer, student_tokenizer, *, system_prompt: str | None = None,
                 name: str | None = None):
        self.inner, self.tokenizer, self.student_tokenizer = inner, tokenizer, student_tokenizer
        self.system_prompt = system_prompt or None
        self.name = name or getattr(inner, "name", "teacher")
        self.model = getattr(inner, "model", None)  # the trainer's context-length check reads it
        self.mode, self._table = _relation(student_tokenizer, tokenizer)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = 0 if pad_id is None else pad_id  # padding is masked out: any id works

    def prompt_text(self, prompt) -> str:
        """The prompt as the teacher reads it: its own chat template, the system prompt first."""
        messages, tools = conversation(prompt)
        if self.system_prompt is None:
            return render_conversation(self.tokenizer, messages, tools)
        if messages[0].get("role") == "system":  # one system message, the privileged text first
            first = {**messages[0], "content": f"{self.system_prompt}\n\n{messages[0].get('content', '')}"}
            with_system = [first, *messages[1:]]
        else:
            with_system = [{"role": "system", "content": self.system_prompt}, *messages]
        try:
            text = render_conversation(self.tokenizer, with_system, tools)
            if self.system_prompt in text:
                return text
        except ValueError:
            pass  # the template refuses a system role
        user = next((k for k, message in enumerate(messages) if message.get("role") == "user"), 0)
        messages = list(messages)
        messages[user] = {**messages[user], "content": f"{self.system_prompt}\n\n{messages[user].get('content', '')}"}
        return render_conversation(self.tokenizer, messages, tools)

    @torch.no_grad()
    def score(self, rollouts, prompts: list) -> torch.Tensor | SpanScores:
        """float32 [N, T] ("same", "mapped": log p of each sampled token, 0 after each row's end) or SpanScores
        ("spans": log p of each aligned span given the text before it, causal all False)."""
        responses = self._responses(rollouts, prompts)
        prompt_ids = self._prompt_ids(prompts)
        mask = response_mask(rollouts)  # [N, T]
        if self.mode == "spans":
            return self._score_spans(rollouts, prompt_ids, responses, mask)
        return self._score_tokens(prompt_ids, self._teacher_ids(responses), mask).to(rollouts.input_ids.device)

    @torch.no_grad()
    def distribution(self, rollouts, prompts: list, top_k: int | None = None):
        """As `Teacher.distribution`, in mode "same" only (the teacher's head must index the student's ids)."""
        if self.mode != "same":
            raise ValueError(f"teacher {self.name}: the dense and top-k estimators need a teacher that reads the "
                             f"student's token ids; this one has another vocabulary ({self.mode}): use "
                             "--estimator opd+ or opd")
        responses = self._responses(rollouts, prompts)
        width = rollouts.input_ids.shape[1] - rollouts.prompt_length  # T: positions line up with the student's
        rows = self._token_rows(self._prompt_ids(prompts), responses, width)
        return self.inner.distribution(rows, top_k)

    def check_tokenizer(self, student_tokenizer) -> None:
        """The student must be the one the id table / alignment was built for; a served inner teacher then checks
        that its server reads this teacher tokenizer's ids as meant."""
        try:
            check_same_vocabulary(student_tokenizer, self.student_tokenizer)
        except ValueError as error:
            raise ValueError(f"teacher {self.name} was set up for another student tokenizer: {error}") from None
        self.inner.check_tokenizer(self.tokenizer)

    def close(self) -> None:
        self.inner.close()

    # ------------------------------------------------------------------ internals

    def _responses(self, rollouts, prompts) -> list[list[int]]:
        """Each row's sampled student ids (under the response mask), after checking what the rows can be."""
        rows = rollouts.input_ids.shape[0]
        if getattr(rollouts, "transcripts", None) is not None:
            raise ValueError(f"teacher {self.name}: multi-turn rollouts are not supported with another tokenizer or "
                             "prompt yet (tool turns would be rendered by each model's own template)")
        if prompts is None or len(prompts) != rows:
            raise ValueError(f"teacher {self.name}: prompts must give one prompt per rollout row ({rows}), got "
                             f"{'none' if prompts is None else len(prompts)}")
        ids, mask = rollouts.input_ids[:, rollouts.prompt_length:].cpu(), response_mask(rollouts).cpu()
        return [row[keep].tolist() for row, keep in zip(ids, mask)]

    def _prompt_ids(self, prompts: list) -> list[list[int]]:
        """The teacher's token ids of each row's prompt, rendered and encoded once per distinct prompt."""
        cache: dict = {}
        encoded = []
        for prompt in prompts:
            key = prompt if isinstance(prompt, str) else id(prompt)  # rows of one prompt share its object
            if key not in cache:
                ids = self.tokenizer(self.prompt_text(prompt), add_special_tokens=False)["input_ids"]
                if not ids:
                    raise ValueError(f"teacher {self.name}: a prompt renders to no tokens with its chat template")
                cache[key] = list(ids)
            encoded.append(cache[key])
        return encoded

    def _teacher_ids(self, responses: list[list[int]]) -> list[list[int]]:
        if self.mode == "same":
            return responses
        table = self._table
        mapped = []
        for response in responses:
            ids = table[torch.tensor(response, dtype=torch.long).clamp(0, len(table) - 1)]
            bad = [token for token, teacher_id in zip(response, ids.tolist())
                   if teacher_id < 0 or not 0 <= token < len(table)]
            if bad:
                raise ValueError(f"teacher {self.name}: student token id {bad[0]} is not in the student tokenizer's "
                                 "vocabulary, so it has no teacher token")
            mapped.append(ids.tolist())
        return mapped

    def _token_rows(self, prompt_ids, responses, width: int | None = None) -> TokenRows:
        """Teacher prompts left-padded to their longest, responses right-padded (to `width`), attention on real
        tokens."""
        prompts, prompt_mask = left_pad(prompt_ids, self.pad_id)
        if width is None:
            width = max((len(response) for response in responses), default=0)
        answers, answer_mask = right_pad(responses, self.pad_id, width)
        return TokenRows(torch.cat([prompts, answers], 1), torch.cat([prompt_mask, answer_mask], 1),
                         prompts.shape[1])

    def _score_tokens(self, prompt_ids, responses, mask: torch.Tensor) -> torch.Tensor:
        """[N, T]: the inner teacher's scores of the responses put back at the student's masked positions."""
        scores = self.inner.score(self._token_rows(prompt_ids, responses)).float().cpu()  # [N, longest]
        counts = torch.tensor([len(response) for response in responses])
        out = torch.zeros(mask.shape, dtype=torch.float32)  # [N, T]
        out[mask.cpu()] = scores[torch.arange(scores.shape[1]) < counts[:, None]]
        return out

    def _score_spans(self, rollouts, prompt_ids, responses, mask: torch.Tensor) -> SpanScores:
        aligned = [align(self.student_tokenizer, response, self.tokenizer) for response in responses]
        teacher_responses = [teacher_ids for teacher_ids, _ in aligned]
        spans = [row_spans for _, row_spans in aligned]
        token_scores = self.inner.score(self._token_rows(prompt_ids, teacher_responses)).float().cpu()  # [N, Tt]
        num_spans = max((len(row) for row in spans), default=0)  # K
        teacher_span_ids = torch.zeros(token_scores.shape, dtype=torch.long)  # [N, Tt]
        teacher_mask = torch.zeros(token_scores.shape, dtype=torch.bool)  # [N, Tt]
        for n, row in enumerate(spans):
            for k, span in enumerate(row):
                teacher_span_ids[n, span.t0:span.t1] = k
                teacher_mask[n, span.t0:span.t1] = True
        logprobs = sum_by_span(token_scores, teacher_span_ids, teacher_mask, num_spans)  # [N, K]
        # single-turn responses are a prefix of their row: student token s sits in column s
        span_ids, covered, span_mask = span_ids_from_spans(spans, mask.shape[1])  # [N, T], [N, T], [N, K]
        if not torch.equal(covered, mask.cpu()):
            raise ValueError(f"teacher {self.name}: the response mask must be a prefix of each row (single-turn)")
        device = rollouts.input_ids.device
        return SpanScores(logprobs.to(device), span_ids.to(device), span_mask.to(device),
                          torch.zeros(len(responses), dtype=torch.bool, device=device))
