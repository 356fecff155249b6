"""Span alignment between two tokenizations of the same text (cross-tokenizer OPD+, issue 17 item 1).

The student's response tokens are decoded to text; the teacher tokenizes that text with its own tokenizer; both
token sequences are split at every character position where both have a token boundary (greedy, left to right).
Each span then names the same piece of text on both sides, so log p(span | everything before) is a sum over the
student's tokens of the span on one side and over the teacher's on the other.

Conventions, decided by decoding (no tokenizer type is assumed):

* A token's *end* is the length of the decoded text of all tokens up to and including it (prefix decoding, what
  a streaming reader sees). It is ``None`` where that prefix is not a prefix of the full text or ends in U+FFFD
  (a multi-byte character split across byte-level tokens): no span may end there. The last non-special token
  always ends at ``len(text)``.
* A *special* token (one that ``decode(..., skip_special_tokens=True)`` drops) is excluded from the text and
  reported as ``SPECIAL``; at a common boundary it becomes its own span of zero characters (paired with a teacher
  special at the same place if there is one, e.g. the student's EOS with the teacher's EOS).
* Zero-width ordinary tokens join the following span (trailing ones: one span of their own at the end).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

SPECIAL = -1  # the "end" reported for a special token: it has no text of its own
REPLACEMENT = "\ufffd"
_WINDOW = 8  # tokens of left context for incremental decoding
_CHECK_EVERY = 64  # an exact prefix decode every this many tokens validates the incremental one


@dataclass(frozen=True)
class Span:
    """Student tokens [s0, s1) and teacher tokens [t0, t1) that spell the same text, characters [start, end)."""

    s0: int
    s1: int
    t0: int
    t1: int
    start: int
    end: int

    @property
    def student(self) -> range:
        return range(self.s0, self.s1)

    @property
    def teacher(self) -> range:
        return range(self.t0, self.t1)


def _special_flags(tokenizer, ids: list[int]) -> list[bool]:
    cache: dict[int, bool] = {}
    for token_id in set(ids):
        cache[token_id] = (tokenizer.decode([token_id], skip_special_tokens=True) == ""
                           and tokenizer.decode([token_id], skip_special_tokens=False) != "")
    return [cache[token_id] for token_id in ids]


def _end_of(piece: str, text: str, at: int) -> int | None:
    """End of `piece` placed at `at` in `text`, or None when it does not continue the text at a character edge."""
    if piece.endswith(REPLACEMENT) or not text.startswith(piece, at):
        return None
    return at + len(piece)


def _exact_ends(decode, ids: list[int], text: str) -> list[int | None]:
    """One decode per prefix: O(n) decodes, O(n^2) characters."""
    return [_end_of(decode(ids[:k + 1]), text, 0) for k in range(len(ids))]


def _windowed_ends(decode, ids: list[int], text: str) -> list[int | None] | None:
    """Decode each token with a few tokens of left context that start after a known clean boundary.

    The context begins one clean boundary earlier than the one the new text is measured from, so effects tied
    to the first decoded token (SentencePiece dropping its leading space) stay in the context. Every
    `_CHECK_EVERY` tokens the result is compared with an exact prefix decode; None means "disagreed, use exact".
    O(n) decodes of O(window) tokens plus O(n / _CHECK_EVERY) full decodes.
    """
    ends: list[int | None] = []
    anchors = [(0, 0)]  # (token index, char position) with decode(ids[:index]) == text[:position]
    base = 0  # index into anchors of the measuring anchor
    context_cache: dict[tuple[int, int], str] = {}
    for k in range(len(ids)):
        while base + 1 < len(anchors) and anchors[base + 1][0] <= k - _WINDOW:
            base += 1
        index, position = anchors[base]
        if base == 0:
            end = _end_of(decode(ids[:k + 1]), text, 0)
        else:
            first = anchors[base - 1][0]
            context = context_cache.get((first, index))
            if context is None:
                context = context_cache[(first, index)] = decode(ids[first:index])
            window = decode(ids[first:k + 1])
            if not window.startswith(context):
                return None
            end = _end_of(window[len(context):], text, position)
        ends.append(end)
        if end is not None:
            anchors.append((k + 1, end))
        if (k + 1) % _CHECK_EVERY == 0 and _end_of(decode(ids[:k + 1]), text, 0) != end:
            return None
    return ends


def _monotone(ends: list) -> list:
    """Drop (to None) any boundary that a later boundary undercuts; SPECIAL entries are left alone."""
    out = list(ends)
    lowest = None
    for k in range(len(out) - 1, -1, -1):
        end = out[k]
        if end is None or end == SPECIAL:
            continue
        if lowest is not None and end > lowest:
            out[k] = None
        else:
            lowest = end
    return out


def plain_backend(tokenizer):
    """The tokenizer's Rust backend when decoding through it gives what `tokenizer.decode` gives (a fast tokenizer
    that does not clean up spaces afterwards), else None. Alignment decodes a few times per token, and
    transformers' own wrapper around the backend's call took about half of that time."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return None if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", False) else backend


def ids_decoder(tokenizer):
    """ids -> text with special tokens kept, as `tokenizer.decode(ids, skip_special_tokens=False)` gives it."""
    backend = plain_backend(tokenizer)
    if backend is not None:
        return lambda ids: backend.decode(ids, skip_special_tokens=False)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=False)


def decode_with_ends(tokenizer, ids: Sequence[int]) -> tuple[str, list[int | None]]:
    """The decoded text (special tokens excluded) and each token's end in it (see `token_char_ends`)."""
    ids = [int(token_id) for token_id in ids]
    special = _special_flags(tokenizer, ids)
    normal = [token_id for token_id, is_special in zip(ids, special) if not is_special]

    decode_ids = ids_decoder(tokenizer)

    def decode(part: list[int]) -> str:
        return decode_ids(part) if part else ""

    text = decode(normal)
    normal_ends = _windowed_ends(decode, normal, text)
    if normal_ends is None:
        normal_ends = _exact_ends(decode, normal, text)
    if normal_ends:
        normal_ends[-1] = len(text)
    normal_ends = _monotone(normal_ends)
    it = iter(normal_ends)
    return text, [SPECIAL if is_special else next(it) for is_special in special]


def token_char_ends(tokenizer, ids: Sequence[int]) -> list[int | None]:
    """For each token, where it ends in the decoded response text (special tokens excluded from the text).

    An int is a character position (the decoded prefix through this token equals text[:end]); None marks a token
    that ends inside a character or whose prefix does not decode to a prefix of the text; SPECIAL (-1) marks a
    special token. Cost: O(n) decodes of a few tokens each plus O(n/64) full-prefix checks (O(n^2/64) characters);
    if a check disagrees, one decode per prefix (O(n) decodes, O(n^2) characters).
    """
    return decode_with_ends(tokenizer, ids)[1]


def ends_from_offsets(offsets: Sequence[tuple[int, int] | None], length: int) -> list[int | None]:
    """Teacher token ends from (start, end) character offsets; None entries are special tokens (SPECIAL).

    A boundary is trusted only where a token's end equals the next token's start: overlapping offsets (a
    character split across byte-level tokens) and gaps (ByteLevel `trim_offsets` dropping the spaces of a token,
    e.g. " world" reported as (6, 11) or "  " as (3, 3)) leave the true boundary unknown, so none is used there.
    Trimming can only shrink a token, so equal end/start is always the true boundary. The last ordinary token ends
    at `length`.
    """
    normal = [k for k, offset in enumerate(offsets) if offset is not None]
    ends: list[int | None] = [SPECIAL] * len(offsets)
    for position, k in enumerate(normal):
        start, end = offsets[k]
        if end > length or start > end:
            raise ValueError(f"offset {offsets[k]} of teacher token {k} is outside the text of length {length}")
        if position + 1 == len(normal):
            ends[k] = length
        else:
            ends[k] = end if offsets[normal[position + 1]][0] == end else None
    return _monotone(ends)


def _next_clean(ends: list, k: int, above: int) -> int | None:
    while k < len(ends):
        end = ends[k]
        if end is not None and end != SPECIAL and end > above:
            return k
        k += 1
    return None


def _next_special(ends: list, k: int) -> int:
    while k < len(ends) and ends[k] != SPECIAL:
        k += 1
    return k


def align_ends(student_ends: Sequence[int | None], teacher_ends: Sequence[int | None]) -> list[Span]:
    """Greedy left-to-right split of both token sequences at every common boundary (linear time)."""
    student, teacher = list(student_ends), list(teacher_ends)
    spans: list[Span] = []
    i = j = position = 0
    while i < len(student) or j < len(teacher):
        student_special = i < len(student) and student[i] == SPECIAL
        teacher_special = j < len(teacher) and teacher[j] == SPECIAL
        if student_special or teacher_special:
            spans.append(Span(i, i + student_special, j, j + teacher_special, position, position))
            i, j = i + student_special, j + teacher_special
            continue
        qi, qj = _next_clean(student, i, position), _next_clean(teacher, j, position)
        while qi is not None and qj is not None and student[qi] != teacher[qj]:
            if student[qi] < teacher[qj]:
                qi = _next_clean(student, qi + 1, teacher[qj] - 1)
            else:
                qj = _next_clean(teacher, qj + 1, student[qi] - 1)
        if qi is None and qj is None:  # only zero-width tokens left before the next special (or the end)
            i2, j2 = _next_special(student, i), _next_special(teacher, j)
            spans.append(Span(i, i2, j, j2, position, position))
            i, j = i2, j2
            continue
        if qi is None or qj is None:
            raise ValueError(f"student and teacher texts disagree after character {position}: "
                             "one side has text the other does not reach")
        end = student[qi]
        spans.append(Span(i, qi + 1, j, qj + 1, position, end))
        i, j, position = qi + 1, qj + 1, end
    return spans


def align_spans(student_ends: Sequence[int | None],
                teacher_offsets: Sequence[tuple[int, int] | None]) -> list[Span]:
    """Spans from the student's token ends (`token_char_ends`) and the teacher's (start, end) character offsets
    of its tokenization of the same text (fast tokenizers' `return_offsets_mapping`; None for a special token).

    Every student and teacher token is in exactly one span; spans' [start, end) tile the text in order.
    """
    length = max([end for end in student_ends if end is not None and end != SPECIAL], default=0)
    return align_ends(student_ends, ends_from_offsets(teacher_offsets, length))


def _teacher_counterpart(student_tokenizer, student_id: int, teacher_tokenizer) -> int | None:
    if student_id == student_tokenizer.eos_token_id:
        return teacher_tokenizer.eos_token_id
    token = student_tokenizer.convert_ids_to_tokens(student_id)
    return teacher_tokenizer.get_vocab().get(token)


def _teacher_segment(teacher_tokenizer, segment: str) -> tuple[list[int], list[int | None]]:
    """The teacher's tokenization of a piece of text with each token's end in it: exact decode-based ends when the
    teacher's tokens decode back to the text, ends from offsets otherwise (normalizers, unknown characters)."""
    if not segment:
        return [], []
    encoding = teacher_tokenizer(segment, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    decoded, ends = decode_with_ends(teacher_tokenizer, ids)
    if decoded == segment and SPECIAL not in ends:
        return ids, ends
    return ids, ends_from_offsets([tuple(offset) for offset in encoding["offset_mapping"]], len(segment))


def align(student_tokenizer, student_ids: Sequence[int], teacher_tokenizer) -> tuple[list[int], list[Span]]:
    """Decode the student's response, tokenize the text with the teacher (no special tokens added), align.

    Student special tokens cut the text into pieces the teacher tokenizes separately (as a tokenizer does with
    special tokens inside a text); each maps to the teacher's token of the same name, the student's EOS to the
    teacher's EOS, and becomes its own span (with an empty teacher range when the teacher has no counterpart).
    A special token that sits inside a character (after an incomplete byte sequence) stays inside its span.
    """
    student_ids = [int(token_id) for token_id in student_ids]
    text, student_ends = decode_with_ends(student_tokenizer, student_ids)
    teacher_ids: list[int] = []
    teacher_ends: list[int | None] = []
    cut = 0  # character where the current teacher piece starts
    last = 0  # end of the last ordinary student token (None: inside a character)

    def add_piece(upto: int) -> None:
        ids, ends = _teacher_segment(teacher_tokenizer, text[cut:upto])
        teacher_ids.extend(ids)
        teacher_ends.extend(end if end is None or end == SPECIAL else end + cut for end in ends)

    for k, end in enumerate(student_ends):
        if end != SPECIAL:
            last = end
            continue
        if last is None:
            continue
        add_piece(last)
        cut = last
        counterpart = _teacher_counterpart(student_tokenizer, student_ids[k], teacher_tokenizer)
        if counterpart is not None:
            teacher_ids.append(counterpart)
            teacher_ends.append(SPECIAL)
    add_piece(len(text))
    return teacher_ids, align_ends(student_ends, teacher_ends)
