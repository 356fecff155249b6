"""Teacher and student must share a vocabulary: the teacher scores the student's token ids as they are.

A local teacher's tokenizer is compared with the student's whole; a served teacher's is asked to encode probe
texts. Every mismatch opens with the same words.
"""

from __future__ import annotations

MISMATCH = "tokenizer mismatch between student and teacher"


def check_same_vocabulary(student_tokenizer, teacher_tokenizer) -> None:
    """Raise ValueError unless every token id maps to the same string and the special tokens agree.

    Embedding matrices padded to different sizes are fine: only the tokenizers' real vocabularies count.
    """
    student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if student_vocab != teacher_vocab:
        differing = sorted(set(student_vocab.items()) ^ set(teacher_vocab.items()), key=lambda item: item[1])
        token, token_id = differing[0]
        raise ValueError(
            f"{MISMATCH}: {len(differing)} differing (token, id) pairs, "
            f"e.g. {token!r} -> {token_id} ({len(student_vocab)} vs {len(teacher_vocab)} tokens)"
        )
    for name in ("eos_token_id", "bos_token_id"):  # pad never reaches the teacher: it is masked out
        student_id, teacher_id = getattr(student_tokenizer, name), getattr(teacher_tokenizer, name)
        if student_id != teacher_id:
            raise ValueError(f"{MISMATCH}: {name} {student_id} vs {teacher_id}")


def probe_strings(tokenizer) -> list[str]:
    """Texts whose token ids must agree between student and a served teacher: digits, punctuation,
    spaces and newlines, and every special token of the student, alone and inside ordinary text."""
    probes = [
        "0123456789 12+34=46 -7.5e3",
        "Hello, world! How are you? (fine); [ok] {yes} <no> 'a' \"b\" `c` ~@#$%^&*_|\\/",
        "  two  spaces, a\ttab and a\nnewline\n\n",
        '{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}',
    ]
    specials = [token for token in tokenizer.all_special_tokens if token]
    probes += specials
    if specials:
        probes.append("x = 1" + "".join(f"{token}word {index}" for index, token in enumerate(specials)))
    return probes
