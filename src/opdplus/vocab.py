"""Teacher and student must share a vocabulary: the teacher scores the student's token ids as they are."""

from __future__ import annotations


def check_same_vocabulary(student_tokenizer, teacher_tokenizer) -> None:
    """Raise ValueError unless every token id maps to the same string and the special tokens agree.

    Embedding matrices padded to different sizes are fine: only the tokenizers' real vocabularies count.
    """
    student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if student_vocab != teacher_vocab:
        differing = sorted(set(student_vocab.items()) ^ set(teacher_vocab.items()), key=lambda item: item[1])
        token, token_id = differing[0]
        raise ValueError(
            f"tokenizer mismatch between student and teacher: {len(differing)} differing (token, id) pairs, "
            f"e.g. {token!r} -> {token_id} ({len(student_vocab)} vs {len(teacher_vocab)} tokens)"
        )
    for name in ("eos_token_id", "bos_token_id"):  # pad never reaches the teacher: it is masked out
        student_id, teacher_id = getattr(student_tokenizer, name), getattr(teacher_tokenizer, name)
        if student_id != teacher_id:
            raise ValueError(f"tokenizer mismatch between student and teacher: {name} {student_id} vs {teacher_id}")
