"""How fast is cross-tokenizer span alignment, which a span-level step runs in Python for every rollout row?

`RetokenizingTeacher._score_spans` calls `opdplus.teachers.spans.align` once per response, on the trainer's
process, before the teacher sees anything; this measures that cost between two realistic tokenizers trained here
on GSM8K text: a byte-level BPE (GPT-2 / Llama-3 / Qwen style; 32k asked,
GSM8K's text runs out of merges at ~25.6k) as the student and a Metaspace BPE
(SentencePiece style, ~16k) as the teacher. Responses are student tokens of GSM8K answers (train split, joined
and cut to 256 and 1024 tokens, the last one EOS); GSM8K's curly quotes, dashes, currency and math signs make the
byte-level student split characters across tokens. Reported: student tokens aligned per second (median over
rows), the time to align a batch of 64 rows of 1024 tokens (the loop `_score_spans` runs), and span shapes.
Every 8th answer is preceded by one of four sentences with accented letters and emoji that the tokenizers never
saw, so both sides spell some characters as several byte tokens.

    python benchmarks/span_alignment.py [--data /work/shared/data/gsm8k] [--rows 64]

Without the data, a synthetic math text (with accented letters and emoji) stands in; the result says so.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from common import report
from opdplus.teachers.spans import SPECIAL, align, token_char_ends

EOS = "<|endoftext|>"
LENGTHS = (256, 1024)
EXTRA_EVERY = 8  # one of these sentences follows every 8th answer in a response, so characters split into bytes
EXTRA = ["Zoë’s café sold 12 crêpes 🥞 at €3 each, so she earned 36 € 😀.",
         "Björn läuft 5 km in 25 min – that is 5 min/km ✓.",
         "José paid ¥1200 for 3 boxes 📦📦📦: 1200 ÷ 3 = 400 ¥ each 🎉.",
         "Ça fait 7 × 8 = 56 pommes 🍎 pour Françoise, n’est-ce pas? 👍🏽"]


def gsm8k_texts(data: Path) -> tuple[list[str], list[str]] | None:
    """(training text for the tokenizers, answers to cut into responses), or None when the files are absent."""
    train = data / "train.jsonl"
    if not train.is_file():
        return None
    records = [json.loads(line) for line in train.read_text(encoding="utf-8").splitlines() if line.strip()]
    corpus = [record["question"] + "\n" + record["answer"] for record in records]
    return corpus, [record["answer"] for record in records]


def synthetic_texts(seed: int) -> tuple[list[str], list[str]]:
    """Word problems built from templates, some with accented names, currency signs and emoji."""
    rng = random.Random(seed)
    names = ["Natalia", "José", "Zoë", "Björn", "Ana", "François", "Mei", "Ömer"]
    items = ["apples 🍎", "clips", "crêpes", "books 📚", "tickets", "cookies 🍪"]
    answers = []
    for _ in range(4000):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        name, item = rng.choice(names), rng.choice(items)
        answers.append(f"{name} buys {a} {item} at €{b} each – that’s {a} × {b} = <<{a}*{b}={a * b}>>{a * b} € 😀.\n"
                       f"Then {name} sells half: {a * b} ÷ 2 = {a * b / 2}.\n#### {a * b / 2}")
    return answers, answers


def train_student(corpus: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE as in GPT-2 / Llama-3 / Qwen: every character is one or more byte tokens."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=True)
    backend.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, clean_up_tokenization_spaces=False)


def train_teacher(corpus: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Metaspace BPE with byte fallback as in SentencePiece (Llama-2 / Mistral style): spaces become '▁' glued to
    the next word, and a character outside the vocabulary becomes its UTF-8 bytes as <0xXX> tokens."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size - 256, special_tokens=["<unk>", EOS], show_progress=False))
    spec = json.loads(backend.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    backend = Tokenizer.from_str(json.dumps(spec))
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])  # Llama-2's decoder
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, unk_token="<unk>",
                                   clean_up_tokenization_spaces=False)


def responses(student: PreTrainedTokenizerFast, answers: list[str], length: int, rows: int,
              seed: int) -> list[list[int]]:
    """`rows` responses of `length` student tokens: joined shuffled answers (with `EXTRA`), cut, ending in EOS."""
    order = list(answers)
    random.Random(seed).shuffle(order)
    ids: list[int] = []
    for n, answer in enumerate(order):
        extra = EXTRA[n // EXTRA_EVERY % len(EXTRA)] + "\n" if n % EXTRA_EVERY == 0 else ""
        ids.extend(student(extra + answer + "\n\n", add_special_tokens=False)["input_ids"])
        if len(ids) >= rows * (length - 1):
            break
    if len(ids) < rows * (length - 1):
        raise SystemExit(f"--rows: the answers give only {len(ids)} tokens, fewer than {rows} x {length - 1}")
    return [ids[n * (length - 1):(n + 1) * (length - 1)] + [student.eos_token_id] for n in range(rows)]


def measure(student, teacher, rows: list[list[int]]) -> dict:
    """Per-row alignment time and the spans' shape."""
    rates, spans_all = [], []
    for row in rows:
        start = time.perf_counter()
        _, spans = align(student, row, teacher)
        rates.append(len(row) / (time.perf_counter() - start))
        spans_all.extend(spans)
    text_spans = [span for span in spans_all if span.end > span.start]
    inside = sum(end is None for row in rows for end in token_char_ends(student, row))
    return {
        "rows": len(rows),
        "tokens_per_s_median": round(statistics.median(rates)),
        "tokens_per_s_min": round(min(rates)),
        "spans_per_row": round(len(spans_all) / len(rows), 1),
        "share_spans_multi_student": round(sum(len(s.student) > 1 for s in text_spans) / len(text_spans), 4),
        "student_tokens_per_span": round(sum(len(s.student) for s in text_spans) / len(text_spans), 3),
        "teacher_tokens_per_span": round(sum(len(s.teacher) for s in text_spans) / len(text_spans), 3),
        "share_student_tokens_inside_a_character": round(inside / sum(map(len, rows)), 5),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("/work/shared/data/gsm8k"),
                        help="folder with GSM8K train.jsonl (synthetic text when absent)")
    parser.add_argument("--rows", type=int, default=64, help="rows per response length")
    parser.add_argument("--student-vocab", type=int, default=32000)
    parser.add_argument("--teacher-vocab", type=int, default=16000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.rows < 1:
        raise SystemExit("--rows must be at least 1")

    texts = gsm8k_texts(args.data)
    source = f"GSM8K train answers from {args.data}"
    if texts is None:
        texts, source = synthetic_texts(args.seed), f"synthetic math text ({args.data}/train.jsonl not found)"
    corpus, answers = texts
    start = time.perf_counter()
    student, teacher = train_student(corpus, args.student_vocab), train_teacher(corpus, args.teacher_vocab)
    training_s = time.perf_counter() - start

    results = {}
    for length in LENGTHS:
        rows = responses(student, answers, length, args.rows, args.seed + length)
        align(student, rows[0], teacher)  # warm-up (vocabulary caches)
        results[f"{length} tokens"] = measure(student, teacher, rows)
    start = time.perf_counter()
    aligned = [align(student, row, teacher) for row in rows]  # rows of the last (longest) length, as _score_spans
    batch_s = time.perf_counter() - start
    assert all(spans[-1].s1 == len(row) for row, (_, spans) in zip(rows, aligned))

    longest = results[f"{LENGTHS[-1]} tokens"]
    report("span_alignment", float(longest["tokens_per_s_median"]),
           f"report: student tokens aligned per second (median over {LENGTHS[-1]}-token rows), >= 20000 wanted",
           lengths=results, batch=f"{len(rows)} rows x {LENGTHS[-1]} tokens aligned in {batch_s:.2f} s",
           batch_s=round(batch_s, 3),
           setup=f"{source}; student byte-level BPE ({student.vocab_size} tokens), teacher Metaspace BPE "
                 f"({teacher.vocab_size} tokens), both trained here in {training_s:.0f} s; seed {args.seed}; "
                 f"responses end in EOS")


if __name__ == "__main__":
    main()
