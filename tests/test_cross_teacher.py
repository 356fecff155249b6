"""Teachers with another tokenizer or another prompt (issue 17): `RetokenizingTeacher` and the router's merge.

Three relations are exercised: a permuted-vocabulary copy of the tiny teacher ("mapped": must score exactly as
the original), a byte-level BPE teacher trained here ("spans": span log-probs must add up to the teacher's own
log-prob of its tokenization of the text), and the student's own vocabulary with a privileged system prompt.
"""

import random

import pytest
import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers import models as token_models
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from opdplus.logprobs import token_logprobs
from opdplus.models import load_model_and_tokenizer
from opdplus.objective.spans import SpanScores
from opdplus.rollout import left_pad, right_pad
from opdplus.rollout.hf import sample
from opdplus.rollout.rollouts import Rollouts
from opdplus.tasks.base import Example
from opdplus.teachers import LocalTeacher, RetokenizingTeacher, vocab_relation
from opdplus.teachers.routing import TeacherRouter
from opdplus.tiny import tiny_config
from permuted import write_permuted_copy

BPE_SPECIALS = ["<pad>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>"]
BPE_TEMPLATE = ("{%- for m in messages -%}<|{{ m['role'] }}|>{{ m['content'] }}"
                "{%- if m['role'] == 'assistant' -%}<eos>{%- endif -%}{%- endfor -%}"
                "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}")
PROMPTS = ["12+34+56=", "40+13+27=", "91+18+44=", "25+25+25="]  # the arith task's form


# ----------------------------------------------------------------------------- models

@pytest.fixture(scope="module")
def student():
    return load_model_and_tokenizer("tiny:arith-student")


@pytest.fixture(scope="module")
def original():
    return load_model_and_tokenizer("tiny:arith-teacher")


@pytest.fixture(scope="module")
def permuted_dir(tmp_path_factory):
    return write_permuted_copy("tiny:arith-teacher", tmp_path_factory.mktemp("permuted"), seed=3)


def bpe_tokenizer():
    """Byte-level BPE (GPT-2 regex, so digit runs merge into tokens like "12") trained on arithmetic strings
    shaped like the arith task's prompts and answers ("12+34=46;46+56=102#102")."""
    rng = random.Random(0)
    corpus = []
    for _ in range(400):
        a, b, c = rng.randint(10, 99), rng.randint(10, 99), rng.randint(10, 99)
        corpus += [f"{a}+{b}+{c}=", f"{a}+{b}={a + b};{a + b}+{c}={a + b + c}#{a + b + c}"]
    backend = Tokenizer(token_models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=BPE_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>",
                                   additional_special_tokens=BPE_SPECIALS[2:], chat_template=BPE_TEMPLATE,
                                   clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module")
def bpe():
    tokenizer = bpe_tokenizer()
    torch.manual_seed(7)
    config = tiny_config(len(tokenizer), 1, 32, 4, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config).eval(), tokenizer


@pytest.fixture(scope="module")
def rollouts(student):
    model, tokenizer = student
    torch.manual_seed(0)
    rows = sample(model, tokenizer, PROMPTS, num_samples=3, max_new_tokens=24)
    return rows, [PROMPTS[i] for i in rows.prompt_index]


def hand_rollouts(tokenizer, prompts, responses, transcripts=None):
    """Rollouts of given response texts (ending in the student's EOS where the text says <|end|>)."""
    prompt_ids, prompt_mask = left_pad([tokenizer(tokenizer.apply_chat_template(
        [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True), add_special_tokens=False)
        ["input_ids"] for p in prompts], tokenizer.pad_token_id)
    response_ids, response_mask = right_pad([tokenizer(r, add_special_tokens=False)["input_ids"] for r in responses],
                                            tokenizer.pad_token_id)
    rows = Rollouts.single_turn(tokenizer, prompt_ids, prompt_mask, response_ids, response_mask.bool(),
                                list(range(len(prompts))))
    rows.transcripts = transcripts
    return rows


def own_logprob(model, tokenizer, prompt_text, response_ids):
    """The teacher's log-prob of its own ids after its own prompt, scored apart from any teacher class."""
    prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + list(response_ids)])
    with torch.no_grad():
        return float(token_logprobs(model, ids, torch.ones_like(ids), start=len(prompt)).sum())


def spans_teacher(bpe, student, **options):
    model, tokenizer = bpe
    return RetokenizingTeacher(LocalTeacher(model, tokenizer, name="bpe", batch_size=4), tokenizer, student[1],
                               **options)


# ----------------------------------------------------------------------------- relations

def test_permuted_copy_is_the_same_model_under_other_ids(original, permuted_dir, student, bpe):
    model, tokenizer = load_model_and_tokenizer("tiny:arith-teacher", dtype=torch.float64)
    copy, copy_tokenizer = load_model_and_tokenizer(str(permuted_dir), dtype=torch.float64)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "12+7="}], tokenize=False,
                                         add_generation_prompt=True) + "19<|end|>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    copy_ids = copy_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids != copy_ids and copy_tokenizer.decode(copy_ids) == text
    assert copy_tokenizer.chat_template == tokenizer.chat_template
    with torch.no_grad():
        want = token_logprobs(model, torch.tensor([ids]), torch.ones(1, len(ids)), start=1)
        got = token_logprobs(copy, torch.tensor([copy_ids]), torch.ones(1, len(copy_ids)), start=1)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert vocab_relation(tokenizer, copy_tokenizer) == "mapped"
    assert vocab_relation(student[1], tokenizer) == "same"
    assert vocab_relation(student[1], bpe[1]) == "spans"


# ----------------------------------------------------------------------------- token-level modes

def test_mapped_teacher_scores_exactly_as_the_unpermuted_teacher(original, permuted_dir, student, rollouts):
    rows, prompts = rollouts
    copy, copy_tokenizer = load_model_and_tokenizer(str(permuted_dir))
    teacher = RetokenizingTeacher(LocalTeacher(copy, copy_tokenizer, batch_size=5), copy_tokenizer, student[1])
    assert teacher.mode == "mapped" and teacher.model is copy and teacher.tokenizer is copy_tokenizer
    got = teacher.score(rows, prompts)
    want = LocalTeacher(original[0], original[1], batch_size=5).score(rows)
    assert got.shape == want.shape == rows.response_mask.shape and got.dtype == torch.float32
    assert torch.equal(got[~rows.response_mask], torch.zeros_like(got[~rows.response_mask]))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    teacher.check_tokenizer(student[1])
    with pytest.raises(ValueError, match="dense and top-k"):
        teacher.distribution(rows, prompts, top_k=4)


def test_same_vocabulary_with_a_system_prompt(original, student, rollouts, bpe):
    rows, prompts = rollouts
    model, tokenizer = original
    plain = LocalTeacher(model, tokenizer)
    same = RetokenizingTeacher(plain, tokenizer, student[1])
    assert same.mode == "same"
    torch.testing.assert_close(same.score(rows, prompts), plain.score(rows), atol=1e-6, rtol=0)

    # the tiny template refuses a system role: the privileged text opens the user message
    privileged = RetokenizingTeacher(plain, tokenizer, student[1], system_prompt="answer: 19")
    assert privileged.prompt_text("12+7=") == "<|user|>answer: 19\n\n12+7=<|assistant|>"
    scores = privileged.score(rows, prompts)
    response_ids = rows.response_ids[0][rows.response_mask[0]].tolist()
    expected = own_logprob(model, tokenizer, privileged.prompt_text(prompts[0]), response_ids)
    assert abs(float(scores[0].sum()) - expected) < 1e-5
    assert not torch.allclose(scores, plain.score(rows))
    distribution_scores, top = privileged.distribution(rows, prompts, top_k=3)
    torch.testing.assert_close(distribution_scores, scores, atol=1e-5, rtol=0)
    assert top.token_ids.shape == (*rows.response_mask.shape, 3)

    # a template with a system role gets a leading system message; an existing one is extended
    with_role = spans_teacher(bpe, student, system_prompt="be exact")
    assert with_role.prompt_text("1+1=") == "<|system|>be exact<|user|>1+1=<|assistant|>"
    example = Example(prompt="", reference=None, response="",
                      messages=({"role": "system", "content": "be brief"}, {"role": "user", "content": "1+1="}))
    assert with_role.prompt_text(example) == "<|system|>be exact\n\nbe brief<|user|>1+1=<|assistant|>"


# ----------------------------------------------------------------------------- spans

def test_span_logprobs_add_up_to_the_teachers_own_tokenization(bpe, student, rollouts):
    rows, prompts = rollouts
    model, tokenizer = bpe
    teacher = spans_teacher(bpe, student, system_prompt="digits only")
    assert teacher.mode == "spans"
    scores = teacher.score(rows, prompts)
    assert isinstance(scores, SpanScores) and not scores.causal.any()
    student_tokenizer, eos = student[1], student[1].eos_token_id
    assert (rows.response_ids == eos).any(1).sum() >= 2  # rows that end in the student's EOS
    widest = 0
    for n in range(len(prompts)):
        sampled = rows.response_ids[n][rows.response_mask[n]].tolist()
        text = student_tokenizer.decode(sampled, skip_special_tokens=True)
        own = tokenizer(text, add_special_tokens=False)["input_ids"]
        own += [tokenizer.eos_token_id] if eos in sampled else []
        expected = own_logprob(model, tokenizer, teacher.prompt_text(prompts[n]), own)
        assert abs(float(scores.logprobs[n].sum()) - expected) < 1e-5
        spans = int(scores.span_mask[n].sum())
        assert scores.span_mask[n, :spans].all() and not scores.span_mask[n, spans:].any()
        ids = scores.span_ids[n][rows.response_mask[n]]
        assert ids[0] == 0 and ids.diff().ge(0).all() and int(ids[-1]) == spans - 1  # every token in order
        widest = max(widest, int(torch.bincount(ids).max()))
    assert scores.logprobs.shape[1] == int(scores.span_mask.sum(1).max())  # K = the longest row's span count
    assert widest >= 2  # BPE merged digits: some span holds several student tokens


def test_student_eos_is_paired_with_the_teachers_eos_in_the_last_span(bpe, student):
    model, tokenizer = bpe
    rows = hand_rollouts(student[1], ["12+7=", "40-13="], ["19<|end|>", "273"])  # the second is cut off
    teacher = spans_teacher(bpe, student)
    scores = teacher.score(rows, ["12+7=", "40-13="])
    prompt = teacher.prompt_text("12+7=")
    text_ids = tokenizer("19", add_special_tokens=False)["input_ids"]
    with_eos = own_logprob(model, tokenizer, prompt, text_ids + [tokenizer.eos_token_id])
    eos_alone = with_eos - own_logprob(model, tokenizer, prompt, text_ids)
    last = int(scores.span_mask[0].sum()) - 1
    assert int(scores.span_ids[0, 2]) == last and int(scores.span_ids[0, 1]) < last  # EOS is a span of its own
    assert abs(float(scores.logprobs[0, last]) - eos_alone) < 1e-5
    cut_off = own_logprob(model, tokenizer, teacher.prompt_text("40-13="),
                          tokenizer("273", add_special_tokens=False)["input_ids"])
    assert abs(float(scores.logprobs[1].sum()) - cut_off) < 1e-5


def test_multi_turn_rollouts_and_missing_prompts_are_refused(bpe, student):
    rows = hand_rollouts(student[1], ["1+1="], ["2<|end|>"], transcripts=[[{"role": "assistant", "content": "2"}]])
    with pytest.raises(ValueError, match="multi-turn") as error:
        spans_teacher(bpe, student).score(rows, ["1+1="])
    assert "\n" not in str(error.value)
    rows.transcripts = None
    with pytest.raises(ValueError, match="one prompt per rollout row"):
        spans_teacher(bpe, student).score(rows, None)
    with pytest.raises(ValueError, match="another student tokenizer"):
        spans_teacher(bpe, student).check_tokenizer(bpe[1])
    spans_teacher(bpe, student).check_tokenizer(student[1])


# ----------------------------------------------------------------------------- router

def test_router_merges_token_rows_and_span_rows_into_one_span_scores(original, bpe, student, rollouts):
    rows, prompts = rollouts
    plain = LocalTeacher(original[0], original[1])
    spans = spans_teacher(bpe, student)
    router = TeacherRouter({"default": plain, "bpe": spans})
    routes = [None if n % 3 else "bpe" for n in range(len(prompts))]
    merged = router.score(rows, routes, prompts)
    assert isinstance(merged, SpanScores)
    plain_rows = [n for n, route in enumerate(routes) if route is None]
    span_rows = [n for n, route in enumerate(routes) if route == "bpe"]
    assert merged.causal.tolist() == [route is None for route in routes]

    T = rows.response_mask.shape[1]
    want_plain = plain.score(rows)[plain_rows]
    got_plain = merged.rows(torch.tensor(plain_rows))
    torch.testing.assert_close(got_plain.logprobs[:, :T], want_plain, atol=1e-6, rtol=0)
    assert torch.equal(got_plain.span_mask[:, :T], rows.response_mask[plain_rows])
    assert not got_plain.span_mask[:, T:].any()
    assert torch.equal(got_plain.span_ids, torch.arange(T).expand(len(plain_rows), T))

    alone = spans.score(rows, prompts)  # the same rows scored without the router
    got_spans = merged.rows(torch.tensor(span_rows))
    width = alone.logprobs.shape[1]
    assert merged.logprobs.shape[1] == max(T, width)
    torch.testing.assert_close(got_spans.logprobs[:, :width], alone.logprobs[span_rows], atol=1e-6, rtol=0)
    assert torch.equal(got_spans.span_mask[:, :width], alone.span_mask[span_rows])
    assert not got_spans.span_mask[:, width:].any()
    assert torch.equal(got_spans.span_ids[rows.response_mask[span_rows]],
                       alone.span_ids[span_rows][rows.response_mask[span_rows]])

    with pytest.raises(ValueError, match="prompts must give one per rollout row"):
        router.score(rows, routes)
    with pytest.raises(ValueError, match="dense and top-k"):
        router.distribution(rows, routes, 4, prompts)
    only_plain = router.score(rows, [None] * len(prompts))  # plain teachers alone: the tensor as before
    assert isinstance(only_plain, torch.Tensor) and torch.equal(only_plain, plain.score(rows))
