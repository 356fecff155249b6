"""Issue 17 (b): with a teacher of another tokenizer, the trainer's expected step is the exact gradient of the
span-level objective, through the real code path.

A character-level student and a BPE teacher trained here (tests/test_exact_spans.py's toy: "ab" is [ab] alone but
[a][bc] inside "abc", so span boundaries look ahead). Every response (EOS after 0-2 characters, or 3 characters
cut off) is a batch of one: the teacher re-tokenizes and scores it through `RetokenizingTeacher` behind the
router, `optimize` takes one SGD step at lr 1, and the probability-weighted sum of (theta before - after), the
expected gradient of the trainer's loss, is compared with grad J computed here from the definition

    J(theta) = sum_y p_theta(y) sum_k f(q_k / p_k),   k over the spans `align` gives,

q_k the teacher's probability of its own tokens of span k after its own prompt. The teacher's scores pass through
float32 (the teacher interface), so "equal" is to about 1e-6 relative.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from opdplus.objective import Objective, get_divergence
from opdplus.parallel import SingleProcess
from opdplus.rollout.rollouts import Rollouts, mask_through_first_eos
from opdplus.teachers import LocalTeacher
from opdplus.teachers.cross import RetokenizingTeacher
from opdplus.teachers.routing import TeacherRouter
from opdplus.teachers.spans import align
from opdplus.trainer import optimize
from test_exact_spans import CHARS, MAX_NEW, student_tokenizer, teacher_tokenizer, tiny_llama, token_logprobs

PROMPT = "ca"


@pytest.fixture(scope="module")
def toy():
    student_tok, teacher_tok = student_tokenizer(), teacher_tokenizer()
    eos = student_tok.eos_token_id
    chars = [student_tok.convert_tokens_to_ids(c) for c in CHARS]
    responses = [[*body, eos] for length in range(MAX_NEW) for body in itertools.product(chars, repeat=length)]
    responses += [list(body) for body in itertools.product(chars, repeat=MAX_NEW)]  # cut off, no EOS
    student, teacher = tiny_llama(len(student_tok), seed=0), tiny_llama(len(teacher_tok), seed=1)
    router = TeacherRouter({"default": RetokenizingTeacher(LocalTeacher(teacher, teacher_tok), teacher_tok,
                                                           student_tok)})
    return dict(student_tok=student_tok, teacher_tok=teacher_tok, responses=responses, student=student,
                teacher=teacher, router=router, eos=eos)


def rollouts_of(toy, response):
    prompt = torch.tensor([toy["student_tok"](PROMPT, add_special_tokens=False)["input_ids"]])
    ids = torch.tensor([response])
    mask = mask_through_first_eos(ids, [toy["eos"]])
    return Rollouts(input_ids=torch.cat([prompt, ids], 1), attention_mask=torch.cat([torch.ones_like(prompt),
                    mask.long()], 1), prompt_length=prompt.shape[1], response_mask=mask, completions=[""],
                    prompt_index=[0])


def true_gradient(toy, divergence) -> torch.Tensor:
    """grad J from J's definition: every response, its spans, the teacher's own tokens scored independently."""
    student, teacher, f = toy["student"], toy["teacher"], get_divergence(divergence).f
    student_prompt = toy["student_tok"](PROMPT, add_special_tokens=False)["input_ids"]
    teacher_prompt = toy["teacher_tok"](PROMPT, add_special_tokens=False)["input_ids"]
    objective = torch.zeros((), dtype=torch.float64)
    for response in toy["responses"]:
        teacher_ids, spans = align(toy["student_tok"], response, toy["teacher_tok"])
        student_lp = token_logprobs(student, student_prompt, [response])[0]  # [T]
        with torch.no_grad():
            teacher_lp = token_logprobs(teacher, teacher_prompt, [teacher_ids])[0]  # [T_teacher]
        terms = [f(teacher_lp[s.t0:s.t1].sum() - student_lp[s.s0:s.s1].sum()) for s in spans]
        objective = objective + student_lp.sum().exp() * torch.stack(terms).sum()
    parameters = list(student.parameters())
    return torch.cat([g.flatten() for g in torch.autograd.grad(objective, parameters)])


def expected_step(toy, objective) -> tuple[torch.Tensor, float]:
    """(sum_y p(y) (theta before - after one optimize step on the batch [y]), total probability)."""
    student = toy["student"]
    parameters = list(student.parameters())
    start = [p.detach().clone() for p in parameters]
    strategy = SingleProcess()
    strategy.wrap(student)
    total, mass = [torch.zeros_like(p) for p in parameters], 0.0
    student_prompt = toy["student_tok"](PROMPT, add_special_tokens=False)["input_ids"]
    for response in toy["responses"]:
        with torch.no_grad():
            probability = float(token_logprobs(student, student_prompt, [response]).sum().exp())
        rollouts = rollouts_of(toy, response)
        scores = toy["router"].score(rollouts, ["default"], [PROMPT])
        assert not bool(scores.causal.any())  # re-tokenized: span-level
        optimizer = torch.optim.SGD(parameters, lr=1.0)
        strategy.attach_optimizer(optimizer, None)
        update = optimize(strategy, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
                          objective, rollouts, scores)
        assert update.applied
        with torch.no_grad():
            for accumulated, parameter, before in zip(total, parameters, start):
                accumulated += probability * (before - parameter)
                parameter.copy_(before)
        mass += probability
    return torch.cat([t.flatten() for t in total]), mass


def relative_error(estimate, truth) -> float:
    return float((estimate - truth).norm() / truth.norm())


@pytest.mark.parametrize("divergence", ["rkl", "fkl", "jsd", "chi2"])
def test_span_opd_plus_through_the_trainer_is_the_exact_gradient(toy, divergence):
    step, mass = expected_step(toy, Objective(divergence, "opd+", gamma=1.0))
    assert mass == pytest.approx(1.0, abs=1e-9)  # the enumeration is complete
    assert relative_error(step, true_gradient(toy, divergence)) < 1e-5


def test_stop_gradient_opd_through_the_trainer_is_biased(toy):
    step, _ = expected_step(toy, Objective("fkl", "opd", gamma=1.0))
    assert relative_error(step, true_gradient(toy, "fkl")) > 1e-2
