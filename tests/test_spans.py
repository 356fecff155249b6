"""Span alignment between two tokenizations of one text (issue 17 item 1), with tokenizers built on the spot."""

import random
import string

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from opdplus.teachers.spans import SPECIAL, Span, align, align_ends, align_spans, token_char_ends

EOS, SEP = "<eos>", "<sep>"
UNICODE = "éèàüñï中文测试👍🙂"
ALPHABET = string.ascii_letters + string.digits + " \n.,!?'-+=()" + UNICODE
WORDS = ("the quick brown fox jumps over a lazy dog while café owners say naïve things about 中文 and 测试 "
         "hello world 👍 okay 🙂 tea señor über 12+34=46 (yes) no, maybe! it's fine - end.").split()


def corpus():
    rng = random.Random(1)
    return [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(300)]


def wrap(backend, **kwargs):
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, additional_special_tokens=[SEP],
                                   clean_up_tokenization_spaces=False, **kwargs)


def char_tokenizer():
    vocab = {token: k for k, token in enumerate([EOS, SEP, "<unk>"] + sorted(set(ALPHABET)))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.add_special_tokens([EOS, SEP])
    backend.decoder = decoders.Fuse()
    return wrap(backend)


def byte_level_tokenizer(vocab_size=420, trim_offsets=True):
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=trim_offsets)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, SEP],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus(), trainer)
    return wrap(backend)


def metaspace_tokenizer():
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[EOS, SEP, "<unk>"],
                                  initial_alphabet=sorted(set(ALPHABET.replace(" ", "▁"))))
    backend.train_from_iterator(corpus(), trainer)
    return wrap(backend)


@pytest.fixture(scope="module")
def toks():
    return {"char": char_tokenizer(), "byte": byte_level_tokenizer(vocab_size=260),
            "bpe": byte_level_tokenizer(), "bpe_untrimmed": byte_level_tokenizer(trim_offsets=False),
            "meta": metaspace_tokenizer()}


TEXTS = ["hello world", "café naïve señor", "中文测试 and 中文", "👍👍 okay 🙂!", "  two  spaces\n\nnewlines \n",
         "12+34=46 (yes)", "über-👍中é", " leading space", "x", ""]
PAIRS = [(s, t) for s in ("char", "byte", "bpe", "meta") for t in ("char", "byte", "bpe", "bpe_untrimmed", "meta")]


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def check(student, student_ids, teacher, teacher_ids, spans, text, alone=True):
    """Spans tile both token sequences and the text; the tokens up to each span's end decode to the text up to
    there on both sides (per teacher piece between its special tokens); byte-level/char spans decode alone too."""
    if not spans:
        assert student_ids == teacher_ids == [] and text == ""
        return
    assert [(s.s0, s.t0, s.start) for s in spans[1:]] == [(s.s1, s.t1, s.end) for s in spans[:-1]]
    assert (spans[0].s0, spans[0].t0, spans[0].start) == (0, 0, 0)
    assert (spans[-1].s1, spans[-1].t1, spans[-1].end) == (len(student_ids), len(teacher_ids), len(text))
    assert "".join(text[s.start:s.end] for s in spans) == text
    teacher_specials = set(teacher.all_special_ids)
    piece_token, piece_char = 0, 0
    for span in spans:
        if span.s1 > span.s0:
            assert student.decode(student_ids[:span.s1], skip_special_tokens=True) == text[:span.end]
        if span.t1 > span.t0 and teacher_ids[span.t1 - 1] in teacher_specials:
            piece_token, piece_char = span.t1, span.end
        elif span.t1 > span.t0:
            piece = teacher.decode(teacher_ids[piece_token:span.t1])
            if teacher.decode(encode(teacher, text[piece_char:])) == text[piece_char:]:
                assert piece == text[piece_char:span.end]
            else:  # the teacher's decoding does not give its text back (a leading space SentencePiece-style
                # decoding drops): its offsets place each token inside the span
                offsets = teacher(text[piece_char:], add_special_tokens=False,
                                  return_offsets_mapping=True)["offset_mapping"]
                for a, b in offsets[span.t0 - piece_token:span.t1 - piece_token]:
                    assert span.start <= a + piece_char <= b + piece_char <= span.end
        if alone and span.end > span.start:  # not SentencePiece-style: no leading space dropped
            alone = student.decode(student_ids[span.s0:span.s1], skip_special_tokens=True)
            assert alone == teacher.decode(teacher_ids[span.t0:span.t1], skip_special_tokens=True)


@pytest.mark.parametrize("key", ["char", "bpe", "meta"])
def test_identical_tokenizers_give_one_span_per_token(toks, key):
    tokenizer = toks[key]
    for text in TEXTS[:-1]:
        ids = encode(tokenizer, text) + [tokenizer.eos_token_id]
        if tokenizer.decode(ids, skip_special_tokens=True) != text:
            continue  # SentencePiece-style decoding drops a leading space: another text, another tokenization
        teacher_ids, spans = align(tokenizer, ids, tokenizer)
        assert teacher_ids == ids
        ends = token_char_ends(tokenizer, ids)
        # a token that ends inside a character (byte-level emoji) merges with the next, on both sides alike, and
        # a zero-width one (a lone SentencePiece "▁" at the start) with the next
        widths = [end - ([0] + [e for e in ends[:k] if e is not None and e != SPECIAL])[-1]
                  for k, end in enumerate(ends) if end is not None and end != SPECIAL]
        expected = sum(1 for width in widths if width > 0) + ends.count(SPECIAL)
        assert len(spans) == expected and all(s.s0 == s.t0 and s.s1 == s.t1 for s in spans)
        if key == "char":
            assert len(spans) == len(ids)


def test_byte_level_splits_inside_characters_and_offsets_are_characters(toks):
    byte = toks["byte"]  # no merges: one token per byte
    ids = encode(byte, "é👍a")
    assert token_char_ends(byte, ids) == [None, 1, None, None, None, 2, 3]
    bpe = toks["bpe"]
    offsets = bpe("中文👍", add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert max(end for _, end in offsets) == 3  # character offsets, not byte offsets


@pytest.mark.parametrize("student_key,teacher_key", PAIRS)
def test_cross_tokenizer_spans_cover_and_agree(toks, student_key, teacher_key):
    student, teacher = toks[student_key], toks[teacher_key]
    for text in TEXTS:
        ids = encode(student, text)
        text = student.decode(ids)  # equal to text except a leading space SentencePiece-style decoding drops
        teacher_ids, spans = align(student, ids, teacher)
        assert teacher_ids == encode(teacher, text)  # the teacher's own tokenization of the text
        check(student, ids, teacher, teacher_ids, spans, text, alone="meta" not in (student_key, teacher_key))


def test_raw_offsets_with_trimmed_byte_level_spaces(toks):
    student, teacher = toks["char"], toks["bpe"]
    for text in TEXTS:
        encoding = teacher(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = encode(student, text)
        spans = align_spans(token_char_ends(student, ids), encoding["offset_mapping"])
        check(student, ids, teacher, encoding["input_ids"], spans, text)
    # "hi   x": the trimmed spaces (3, 3), (4, 4) hide where tokens end: no boundary is invented there
    spans = align_spans([1, 2, 3, 4, 5, 6], [(0, 1), (1, 2), (3, 3), (4, 4), (5, 6)])
    assert [(s.start, s.end) for s in spans] == [(0, 1), (1, 6)]


def test_eos_and_special_tokens_are_their_own_spans(toks):
    for student_key, teacher_key in [("char", "bpe"), ("bpe", "char"), ("byte", "meta"), ("meta", "bpe")]:
        student, teacher = toks[student_key], toks[teacher_key]
        sep = student.convert_tokens_to_ids(SEP)
        ids = encode(student, "café 中文") + [sep] + encode(student, "👍 ok") + [student.eos_token_id]
        teacher_ids, spans = align(student, ids, teacher)
        text = student.decode(ids, skip_special_tokens=True)  # "café 中文👍 ok", or "café 中文 👍 ok" with a
        # Metaspace student, whose "👍 ok" encoded alone begins with "▁"
        check(student, ids, teacher, teacher_ids, spans, text, alone="meta" not in (student_key, teacher_key))
        sep_span = next(s for s in spans if s.s0 == ids.index(sep))
        assert sep_span.s1 - sep_span.s0 == 1 and sep_span.start == sep_span.end == len("café 中文")
        assert teacher_ids[sep_span.t0:sep_span.t1] == [teacher.convert_tokens_to_ids(SEP)]
        assert spans[-1] == Span(len(ids) - 1, len(ids), len(teacher_ids) - 1, len(teacher_ids), len(text), len(text))
        assert teacher_ids[-1] == teacher.eos_token_id
        ends = token_char_ends(student, ids)
        assert ends[-1] == SPECIAL and ends[ids.index(sep)] == SPECIAL


def test_special_without_teacher_counterpart_gets_an_empty_teacher_range():
    spans = align_ends([1, SPECIAL, 2, SPECIAL], [2, SPECIAL])
    assert spans == [Span(0, 3, 0, 1, 0, 2), Span(3, 4, 1, 2, 2, 2)]  # a special inside a teacher token stays in
    spans = align_ends([1, SPECIAL, 2], [1, 2])
    assert spans == [Span(0, 1, 0, 1, 0, 1), Span(1, 2, 1, 1, 1, 1), Span(2, 3, 1, 2, 1, 2)]


def test_long_response_matches_exact_prefix_decoding(toks):
    rng = random.Random(7)
    for key in ("bpe", "meta", "byte"):
        tokenizer = toks[key]
        text = "".join(rng.choice(ALPHABET) for _ in range(600))
        ids = encode(tokenizer, text)
        exact = []
        for k in range(len(ids)):
            prefix = tokenizer.decode(ids[:k + 1])
            exact.append(len(prefix) if text.startswith(prefix) and not prefix.endswith("\ufffd") else None)
        exact[-1] = len(text)
        assert token_char_ends(tokenizer, ids) == exact


def test_random_strings_property(toks):
    rng = random.Random(0)
    texts = ["".join(rng.choice(ALPHABET) for _ in range(rng.randrange(0, 40))) for _ in range(200)]
    for index, text in enumerate(texts):
        student_key, teacher_key = PAIRS[index % len(PAIRS)]
        student, teacher = toks[student_key], toks[teacher_key]
        ids = encode(student, text) + [student.eos_token_id]
        teacher_ids, spans = align(student, ids, teacher)
        check(student, ids, teacher, teacher_ids, spans, student.decode(ids, skip_special_tokens=True),
              alone="meta" not in (student_key, teacher_key))
        assert teacher_ids[-1] == teacher.eos_token_id and spans[-1].s0 == len(ids) - 1
