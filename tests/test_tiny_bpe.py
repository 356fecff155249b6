"""The packaged cross-tokenizer teacher tiny:arith-teacher-bpe: a byte-level BPE tokenizer that is not the
student's, round-trips task text, solves arith with its own chat template and aligns with the char student."""

import pytest
import torch

from opdplus.models import load_model_and_tokenizer
from opdplus.rollout.evaluation import evaluate
from opdplus.rollout.prompts import render_prompt
from opdplus.tasks import get_task
from opdplus.teachers.spans import align
from opdplus.teachers.vocab import MISMATCH, check_same_vocabulary
from opdplus.tiny.bpe import build_bpe_tokenizer
from opdplus.tiny.tokenizer import SPECIAL_TOKENS


@pytest.fixture(scope="module")
def teacher():
    return load_model_and_tokenizer("tiny:arith-teacher-bpe")


@pytest.fixture(scope="module")
def student_tokenizer():
    return load_model_and_tokenizer("tiny:arith-student")[1]


def test_loads_as_float32_llama_with_the_tiny_special_tokens(teacher):
    model, tokenizer = teacher
    assert model.dtype == torch.float32 and model.config.model_type == "llama"
    assert 300 <= len(tokenizer) <= 400 and model.config.vocab_size == len(tokenizer)
    assert (tokenizer.pad_token, tokenizer.unk_token, tokenizer.eos_token) == ("<|pad|>", "<|unk|>", "<|end|>")
    for token in SPECIAL_TOKENS:
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [tokenizer.convert_tokens_to_ids(token)]
    assert model.config.eos_token_id == tokenizer.eos_token_id


def test_merges_make_multi_character_tokens_and_text_round_trips(teacher):
    tokenizer = teacher[1]
    examples = get_task("arith").examples("test", 50)
    for example in examples:
        for text in (example.prompt, example.response, render_prompt(tokenizer, example.prompt)):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert tokenizer.decode(ids) == text
    response_ids = tokenizer(examples[0].response, add_special_tokens=False)["input_ids"]
    assert len(response_ids) < len(examples[0].response)  # a digit and the operator after it are one token
    assert tokenizer.convert_ids_to_tokens(tokenizer("37+45=82")["input_ids"]) == ["3", "7+", "4", "5=", "8", "2"]
    odd = "  two  spaces,\ta tab, é and a\nnewline\n\n"  # byte-level: nothing outside the task text is lost
    ids = tokenizer(odd, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == odd


def test_same_template_and_special_names_as_the_student_but_not_the_same_vocabulary(teacher, student_tokenizer):
    tokenizer = teacher[1]
    assert tokenizer.chat_template == student_tokenizer.chat_template
    assert render_prompt(tokenizer, "12+3=") == render_prompt(student_tokenizer, "12+3=") == "<|user|>12+3=<|assistant|>"
    for token in SPECIAL_TOKENS:
        assert tokenizer.convert_tokens_to_ids(token) != student_tokenizer.convert_tokens_to_ids(token)
    with pytest.raises(ValueError, match=MISMATCH):
        check_same_vocabulary(student_tokenizer, tokenizer)


def test_greedy_solves_held_out_problems_with_its_own_chat_template(teacher):
    model, tokenizer = teacher
    task = get_task("arith")
    examples = task.examples("test", 32, seed=1)
    assert evaluate(model, tokenizer, task, examples)["greedy_accuracy"] >= 0.95


def test_student_tokens_of_a_gold_response_align_to_teacher_tokens_in_multi_token_spans(teacher, student_tokenizer):
    tokenizer = teacher[1]
    response = get_task("arith").examples("test", 1)[0].response
    student_ids = student_tokenizer(response, add_special_tokens=False)["input_ids"] + [student_tokenizer.eos_token_id]
    teacher_ids, spans = align(student_tokenizer, student_ids, tokenizer)
    assert teacher_ids == tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert [span.s0 for span in spans[1:]] == [span.s1 for span in spans[:-1]] and spans[-1].s1 == len(student_ids)
    assert any(len(span.student) > 1 and len(span.teacher) == 1 for span in spans)
    assert all(len(span.teacher) == 1 for span in spans)  # every teacher token is whole characters
    assert spans[-1].student == range(len(student_ids) - 1, len(student_ids)) and spans[-1].start == spans[-1].end


def test_vocab_size_below_bytes_and_specials_is_refused():
    with pytest.raises(ValueError, match="vocab_size must exceed 261"):
        build_bpe_tokenizer(["1+1=2"], vocab_size=200)
