"""Span-level OPD / OPD+ advantages for a teacher with another tokenizer (issue 17; not wired into the trainer).

The student samples tokens y; its text is split into spans k = 1..K at the character positions where both the
student's tokens and the teacher's tokenization of the same text have a boundary (`opdplus.teachers.spans.align`).
With p_k = prod of the student's probs of its tokens in span k and q_k = prod of the teacher's probs of its own
tokens of span k (given its tokens of everything before), u_k = q_k / p_k = exp(l_k). The objective

    J(theta) = E_y[ sum_k f(u_k) ]

has the exact gradient (REINFORCE on the sum plus the direct term through p_k; grad log p(y) = sum_k grad log p_k)

    -grad J = E_y[ sum_k A_k grad log p_k ],     A_k = w_f(u_k) - sum_{k' != k} f(u_k'),   w_f = -f + u f'

so every student token of span k gets A_k (credit "all"). Credit "future" keeps only k' > k (the token-level
causal form, `token_advantages(gamma=1)` when every span is one token). Dropping k' < k is unbiased only when span
boundaries are stopping times of the student's sampling and the teacher's tokenization of earlier text does not
depend on later text; BPE merges violate both (whether "a" ends a span depends on whether "b" follows, and "ab"
may be [ab] alone but [a][bc] in "abc"), so "future" can be biased; "all" is exact for any alignment.
Estimator "opd" replaces w_f by the stop-gradient reward -f (exact only for rkl, as at token level).

Layout: the teacher's side is given per span, `teacher_span_logprobs [N, K]` = log q_k (sum of the teacher's
token log-probs of span k, e.g. `sum_by_span(teacher_token_logprobs, teacher_span_ids, teacher_mask, K)`);
`span_ids [N, T]` maps each student token to its span (in text order, 0..K-1; any value at masked positions).
Per-span tensors avoid putting a span's value "at one of its tokens", which is impossible for a span with no
student token (e.g. trailing zero-width teacher tokens, whose f(u) still counts in J): pass `span_mask`.
Pure tensors, no models or tokenizers; everything returned is detached.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from opdplus.objective.advantages import (check_estimator, check_log_ratio_clip, check_token_inputs,
                                          discounted_future_sum)
from opdplus.objective.divergences import Divergence, get_divergence

CREDITS = ("all", "future")


@dataclass(frozen=True)
class SpanScores:
    """A teacher's scores of the rollouts per aligned span, what the span-level loss reads (rows as the rollouts').

    causal rows are scored token by token (a teacher that reads the student's tokens, mapped or as they are:
    span k is token k), so their credit is the token-level causal one with the discount gamma; the other rows
    were re-tokenized by the teacher and take the two-sided credit (exact at gamma = 1, see `span_advantages`).
    """

    logprobs: Tensor  # [N, K] float32 log q_k of span k given everything before it; 0 on missing spans
    span_ids: Tensor  # [N, T] int64 span of each student response token (0 where the token is in no span)
    span_mask: Tensor  # [N, K] bool: which spans exist
    causal: Tensor  # [N] bool: rows scored token by token

    def rows(self, index) -> SpanScores:
        """These rows (a slice or an index tensor), spans and tokens unchanged."""
        return SpanScores(self.logprobs[index], self.span_ids[index], self.span_mask[index], self.causal[index])

    @classmethod
    def tokens(cls, teacher_logprobs: Tensor, mask: Tensor) -> SpanScores:
        """Token-level scores [N, T] as spans of one token each (causal rows)."""
        rows, length = teacher_logprobs.shape
        span_ids = torch.arange(length, device=teacher_logprobs.device).expand(rows, length).clone()
        return cls(teacher_logprobs.float(), span_ids, mask.bool().clone(),
                   torch.ones(rows, dtype=torch.bool, device=teacher_logprobs.device))


def check_credit(credit: str) -> str:
    if credit not in CREDITS:
        raise ValueError(f"credit must be one of {', '.join(CREDITS)}, got {credit!r}")
    return credit


def _check_span_ids(span_ids: Tensor, mask: Tensor, num_spans: int) -> Tensor:
    """Validated span ids [N, T] (int64) with masked positions set to 0 (safe for gather / scatter)."""
    if not isinstance(span_ids, Tensor) or span_ids.shape != mask.shape:
        shape = tuple(span_ids.shape) if isinstance(span_ids, Tensor) else type(span_ids).__name__
        raise ValueError(f"span_ids must be a tensor of shape {tuple(mask.shape)}, got {shape}")
    if span_ids.is_floating_point() or span_ids.dtype == torch.bool:
        raise ValueError(f"span_ids must be an integer tensor, got {span_ids.dtype}")
    span_ids = torch.where(mask, span_ids.long(), 0)  # [N, T]
    if mask.any() and (span_ids[mask].min() < 0 or span_ids[mask].max() >= num_spans):
        raise ValueError(f"span_ids at unmasked positions must be in [0, {num_spans})")
    return span_ids


def sum_by_span(values: Tensor, span_ids: Tensor, mask: Tensor, num_spans: int) -> Tensor:
    """sum over unmasked t with span_ids[n, t] = k of values[n, t]: [N, T] -> [N, K]. Differentiable in values
    (the student's log p_k, the teacher's log q_k from its own token log-probs and token-to-span ids)."""
    mask = check_token_inputs(mask, values=values)
    span_ids = _check_span_ids(span_ids, mask, num_spans)
    out = values.new_zeros(values.shape[0], num_spans)  # [N, K]
    return out.scatter_add(1, span_ids, torch.where(mask, values, 0.0))


def span_log_ratios(
    student_logprobs: Tensor,
    teacher_span_logprobs: Tensor,
    span_ids: Tensor,
    mask: Tensor,
    span_mask: Tensor | None = None,
    log_ratio_clip: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Detached span log-ratios l_k = log q_k - log p_k [N, K] (0 where span_mask is False) and span_mask [N, K].

    Args:
        student_logprobs: [N, T] log p_theta(y_t | y_<t) of the sampled student tokens.
        teacher_span_logprobs: [N, K] log q_k, the teacher's log-prob of span k (its own tokens) given the text
            before it.
        span_ids: [N, T] integer span index of each student token (0..K-1, spans in text order).
        mask: [N, T] bool or 0/1; False for padding and for tokens that belong to no span.
        span_mask: [N, K] which spans exist; default: spans with at least one unmasked student token.
        log_ratio_clip: clamp l_k to [-c, c].
    """
    mask = check_token_inputs(mask, student_logprobs=student_logprobs)
    log_ratio_clip = check_log_ratio_clip(log_ratio_clip)
    if not isinstance(teacher_span_logprobs, Tensor) or teacher_span_logprobs.dim() != 2 \
            or teacher_span_logprobs.shape[0] != mask.shape[0] or not teacher_span_logprobs.is_floating_point():
        raise ValueError(f"teacher_span_logprobs must be a float tensor of shape [{mask.shape[0]}, num_spans]")
    num_spans = teacher_span_logprobs.shape[1]
    span_ids = _check_span_ids(span_ids, mask, num_spans)
    with torch.no_grad():
        counts = torch.zeros(mask.shape[0], num_spans, dtype=torch.long, device=mask.device)  # [N, K]
        counts.scatter_add_(1, span_ids, mask.long())
        if span_mask is None:
            span_mask = counts > 0
        else:
            if not isinstance(span_mask, Tensor) or span_mask.shape != teacher_span_logprobs.shape:
                raise ValueError(f"span_mask must have shape {tuple(teacher_span_logprobs.shape)}")
            span_mask = span_mask.bool()
            if (counts.bool() & ~span_mask).any():
                raise ValueError("an unmasked student token belongs to a span that span_mask excludes")
        if not torch.isfinite(teacher_span_logprobs.detach()[span_mask]).all():
            raise ValueError("teacher_span_logprobs holds NaN or inf in an unmasked span")
        student_span = sum_by_span(student_logprobs.detach(), span_ids, mask, num_spans)  # [N, K] log p_k
        log_ratio = torch.where(span_mask, teacher_span_logprobs.detach() - student_span, 0.0)  # [N, K]
        if log_ratio_clip is not None:
            log_ratio = log_ratio.clamp(-log_ratio_clip, log_ratio_clip)
    return log_ratio, span_mask


def span_advantages(
    student_logprobs: Tensor,
    teacher_span_logprobs: Tensor,
    span_ids: Tensor,
    mask: Tensor,
    *,
    divergence: str | Divergence,
    estimator: str = "opd+",
    credit: str = "all",
    log_ratio_clip: float | None = None,
    span_mask: Tensor | None = None,
    center: bool = False,
) -> Tensor:
    """Detached per-token advantages [N, T] for the loss -sum_t A_t log p_theta(y_t): A_t = A_{span_ids[t]}, with

        A_k = own_k + sum_{k' in C(k)} -f(u_k'),   own_k = w_f(u_k) ("opd+") or -f(u_k) ("opd"),
        C(k) = all other existing spans (credit "all": the exact gradient of E[sum_k f(u_k)] for "opd+")
             | spans k' > k             (credit "future": the causal form; biased when boundaries look ahead).

    center: subtract own's value at u = 1 (a constant on every token: E[grad log p(y)] = 0 keeps the expected
    step unchanged). Arguments as in `span_log_ratios`; 0 at masked tokens.
    """
    divergence = get_divergence(divergence)
    check_estimator(estimator)
    check_credit(credit)
    log_ratio, span_mask = span_log_ratios(student_logprobs, teacher_span_logprobs, span_ids, mask,
                                           span_mask, log_ratio_clip)  # [N, K], [N, K]
    causal = torch.full((mask.shape[0],), credit == "future", dtype=torch.bool, device=mask.device)  # [N]
    span_advantage = _span_credit(log_ratio, span_mask, causal, divergence, estimator, 1.0, center)  # [N, K]
    return _per_token(span_advantage, span_ids, mask)


def _span_credit(log_ratio: Tensor, span_mask: Tensor, causal: Tensor, divergence: Divergence, estimator: str,
                 gamma: float, center: bool) -> Tensor:
    """A_k [N, K] from clipped span log-ratios: own_k + sum_{k' > k} gamma^j (-f(u_k')) and, on rows not `causal`,
    the mirror image over k' < k; j counts the existing spans in between. 0 on missing spans."""
    with torch.no_grad():
        rewards = torch.where(span_mask, divergence.reward(log_ratio), 0.0)  # [N, K] -f(u_k)
        own = divergence.weight(log_ratio) if estimator == "opd+" else rewards  # [N, K]
        if center:
            zero = torch.zeros((), dtype=log_ratio.dtype, device=log_ratio.device)
            own = own - (divergence.weight(zero) if estimator == "opd+" else divergence.reward(zero))
        later = discounted_future_sum(rewards, span_mask, gamma)  # [N, K]
        earlier = discounted_future_sum(rewards.flip(-1), span_mask.flip(-1), gamma).flip(-1)  # [N, K]
        return torch.where(span_mask, own + later + torch.where(causal[:, None], 0.0, earlier), 0.0)


def _per_token(span_advantage: Tensor, span_ids: Tensor, mask: Tensor) -> Tensor:
    """Each student token gets its span's value: [N, K] -> [N, T], 0 at masked tokens."""
    mask = mask.bool()
    ids = torch.where(mask, span_ids.long(), 0)  # [N, T]
    return torch.where(mask, span_advantage.gather(1, ids), 0.0)


def span_ids_from_spans(spans_per_row, length: int, device=None) -> tuple[Tensor, Tensor, Tensor]:
    """From `align`'s spans (one list per row): student span ids [N, T], the student mask [N, T] (True on
    tokens inside a span) and span_mask [N, K] (K = the longest list), T = `length` response positions."""
    rows = len(spans_per_row)
    num_spans = max((len(spans) for spans in spans_per_row), default=0)
    span_ids = torch.zeros(rows, length, dtype=torch.long, device=device)
    mask = torch.zeros(rows, length, dtype=torch.bool, device=device)
    span_mask = torch.zeros(rows, num_spans, dtype=torch.bool, device=device)
    for n, spans in enumerate(spans_per_row):
        for k, span in enumerate(spans):
            span_mask[n, k] = True
            span_ids[n, span.s0:span.s1] = k
            mask[n, span.s0:span.s1] = True
    return span_ids, mask, span_mask


def span_loss_terms(spans: SpanScores, student_logprobs: Tensor, mask: Tensor, divergence: Divergence, estimator: str,
                    gamma: float, log_ratio_clip: float | None, center: bool) -> tuple[Tensor, Tensor, Tensor]:
    """What the loss needs from a teacher's span scores: (advantages [N, T], log-ratios [N, T] clipped,
    the same unclipped), all detached. Settings are already validated (`Objective`).

    Every student token of span k gets A_k = own_k + sum_{k' > k} gamma^j (-f(u_k')), j counting the existing
    spans in (k, k'] as at token level, and on re-tokenized rows (not `spans.causal`) also the mirror image
    sum_{k' < k} gamma^j (-f(u_k')): at gamma = 1 the exact gradient of E[sum_k f(u_k)] (`span_advantages`,
    credit "all"), at gamma = 0 the per-span term alone; in between a discounted surrogate. On causal rows (one
    token per span) this is exactly `token_advantages`. The log-ratios [N, T] hold l_k at the last student token
    of span k and 0 elsewhere (for the metrics: sums over tokens are then sums over spans; a span with no student
    token is left out of them, not out of the advantages).
    """
    mask = mask.bool()
    with torch.no_grad():
        raw, span_mask = span_log_ratios(student_logprobs, spans.logprobs, spans.span_ids, mask, spans.span_mask)
        log_ratio = raw.clamp(-log_ratio_clip, log_ratio_clip) if log_ratio_clip is not None else raw  # [N, K]
        span_advantage = _span_credit(log_ratio, span_mask, spans.causal, divergence, estimator, gamma, center)
        advantages = _per_token(span_advantage, spans.span_ids, mask)  # [N, T]
    return advantages, at_last_token(log_ratio, spans, mask), at_last_token(raw, spans, mask)


def at_last_token(values: Tensor, spans: SpanScores, mask: Tensor) -> Tensor:
    """Per-span values [N, K] placed at the last student token of each span [N, T], 0 elsewhere (spans without a
    student token are dropped): sums over tokens are then sums over spans."""
    mask = mask.bool()
    ids = torch.where(mask, spans.span_ids.long(), 0)  # [N, T]
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(ids)
    last = torch.full(values.shape, -1, dtype=torch.long, device=mask.device).scatter_reduce(
        1, ids, torch.where(mask, positions, -1), "amax")  # [N, K] last student token of each span, -1: none
    keep = spans.span_mask.bool() & (last >= 0)
    rows = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(last)
    placed = torch.zeros(mask.shape, dtype=values.dtype, device=mask.device)
    placed[rows[keep], last[keep]] = values[keep]
    return placed


def span_token_log_ratios(spans: SpanScores, student_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Unclipped span log-ratios l_k = log q_k - log p_k placed at each span's last token [N, T] (detached)."""
    with torch.no_grad():
        raw, _ = span_log_ratios(student_logprobs, spans.logprobs, spans.span_ids, mask, spans.span_mask)
        return at_last_token(raw, spans, mask)
