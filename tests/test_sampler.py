"""The KV-cached sampler against HF `generate`, and its sampling distribution against the model's softmax."""

import math

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from opdplus.logprobs import token_logprobs
from opdplus.rollout import left_pad, mask_through_first_eos
from opdplus.rollout.sampler import generate

VOCAB, PAD, EOS = 101, 0, [1, 2]
# A fifth of the vocabulary ends a response, so that rows finish at different steps within a few tokens.
MANY_EOS = list(range(1, 21))
SAMPLING = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}


def _make(kind: str):
    torch.manual_seed(0)
    # initializer_range 0.2: peaked next-token distributions, so greedy paths are far from ties
    common = {"vocab_size": VOCAB, "initializer_range": 0.2, "pad_token_id": PAD, "eos_token_id": EOS[0], "bos_token_id": 3}
    if kind == "llama":
        config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                             intermediate_size=128, max_position_embeddings=128, **common)
        return LlamaForCausalLM(config).eval()
    if kind == "qwen2":
        config = Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=128, max_position_embeddings=128, **common)
        return Qwen2ForCausalLM(config).eval()
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, **common)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def model(request):
    return _make(request.param)


def _prompts(padded: bool, rows: int = 6):
    generator = torch.Generator().manual_seed(1)
    lengths = [3 + (row * 2) % 7 for row in range(rows)] if padded else [7] * rows
    return left_pad([torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in lengths], PAD)


def _hf(model, ids, mask, eos_ids, max_new_tokens, **sampling):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=PAD,
                          eos_token_id=eos_ids, **sampling)


@pytest.mark.parametrize("padded", [False, True])
def test_samples_of_one_prompt_share_its_prefill_and_still_equal_hf_generate(model, padded):
    # 4 prompts x 4 samples, rows grouped as the trainer groups them: the sampler runs 4 prompts through the
    # prefill instead of 16 and gathers their keys and values, generate runs all 16
    ids, mask = _prompts(padded, rows=4)
    ids, mask = ids.repeat_interleave(4, 0), mask.repeat_interleave(4, 0)
    calls = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape),
                                           with_kwargs=True)
    try:
        torch.manual_seed(0)
        actual = generate(model, ids, mask, max_new_tokens=24, eos_ids=MANY_EOS, pad_id=PAD)
    finally:
        hook.remove()
    assert calls[0] == (4, ids.shape[1]) and calls[1] == (16, 1)
    torch.manual_seed(0)
    assert torch.equal(actual, _hf(model, ids, mask, MANY_EOS, 24, **SAMPLING))
    assert len({tuple(row) for row in actual[:4, ids.shape[1]:].tolist()}) > 1  # the samples of a prompt differ


@pytest.mark.parametrize("padded", [False, True])
def test_greedy_equals_hf_generate(model, padded):
    ids, mask = _prompts(padded)
    for eos_ids in (EOS, MANY_EOS):
        expected = _hf(model, ids, mask, eos_ids, 24, do_sample=False)
        actual = generate(model, ids, mask, max_new_tokens=24, eos_ids=eos_ids, pad_id=PAD, greedy=True)
        assert torch.equal(actual, expected)


@pytest.mark.parametrize("padded", [False, True])
def test_samples_are_bit_identical_to_hf_generate_with_the_same_seed(model, padded):
    # generate draws one torch.multinomial over all rows per step, finished rows included; so does the sampler
    ids, mask = _prompts(padded, rows=16)
    for seed, eos_ids in ((0, EOS), (1, MANY_EOS)):
        torch.manual_seed(seed)
        expected = _hf(model, ids, mask, eos_ids, 24, **SAMPLING)
        torch.manual_seed(seed)
        actual = generate(model, ids, mask, max_new_tokens=24, eos_ids=eos_ids, pad_id=PAD)
        assert torch.equal(actual, expected)
    # a different seed gives different samples: the comparison above is not vacuous
    torch.manual_seed(2)
    other = generate(model, ids, mask, max_new_tokens=24, eos_ids=MANY_EOS, pad_id=PAD)
    assert other.shape != actual.shape or not torch.equal(other, actual)


@pytest.mark.parametrize("pad_id", [PAD, MANY_EOS[0]], ids=["pad-distinct", "pad-is-eos"])
def test_rows_stop_at_their_first_eos_and_the_loop_stops_when_all_have(model, pad_id):
    ids, mask = _prompts(padded=True, rows=12)
    prompt_length, max_new_tokens = ids.shape[1], 40
    forward_calls = []
    hook = model.register_forward_pre_hook(lambda *args: forward_calls.append(1))
    try:
        torch.manual_seed(3)
        output = generate(model, ids, mask, max_new_tokens=max_new_tokens, eos_ids=MANY_EOS, pad_id=pad_id)
    finally:
        hook.remove()
    assert torch.equal(output[:, :prompt_length], ids)
    response = output[:, prompt_length:]
    is_eos = torch.isin(response, torch.tensor(MANY_EOS))
    assert is_eos.any(dim=1).all(), "every row ends with an EOS well within 40 tokens"
    first_eos = is_eos.long().argmax(dim=1)
    steps = response.shape[1]
    assert steps < max_new_tokens  # stopped early...
    assert steps == int(first_eos.max()) + 1  # ...right after the last row's first EOS
    assert len(forward_calls) == steps  # one prefill, then one forward per new token, none after stopping
    after_eos = torch.arange(steps)[None, :] > first_eos[:, None]
    assert (response[after_eos] == pad_id).all()
    assert len(set(first_eos.tolist())) > 1  # rows did finish at different steps


def test_left_padding_does_not_change_a_prompts_greedy_continuation(model):
    # With position ids from the mask, padding is invisible, also for GPT-2's absolute position embeddings.
    ids, mask = _prompts(padded=True)
    batched = generate(model, ids, mask, max_new_tokens=16, eos_ids=EOS, pad_id=PAD, greedy=True)
    assert mask.sum(1).unique().numel() > 1
    for row in range(ids.shape[0]):
        alone = ids[row, mask[row].bool()][None]
        single = generate(model, alone, torch.ones_like(alone), max_new_tokens=16, eos_ids=EOS, pad_id=PAD, greedy=True)
        continuation = single[0, alone.shape[1]:]
        assert torch.equal(batched[row, ids.shape[1]: ids.shape[1] + continuation.numel()], continuation)
        assert (batched[row, ids.shape[1] + continuation.numel():] == PAD).all()


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic, with the cells expected fewer than 5 times pooled into one; and its degrees of freedom."""
    expected, observed = probs.double() * counts.sum(), counts.double()
    small = expected < 5
    if small.any():
        observed = torch.cat([observed[~small], observed[small].sum()[None]])
        expected = torch.cat([expected[~small], expected[small].sum()[None]])
    return float(((observed - expected) ** 2 / expected).sum()), observed.numel() - 1


def test_first_tokens_follow_the_models_softmax(model):
    prompt = torch.tensor([[5, 17, 42, 8, 99]])
    with torch.no_grad():
        probs = torch.softmax(model(prompt).logits[0, -1].double(), -1)
    rows = 20_000
    torch.manual_seed(4)
    output = generate(model, prompt.expand(rows, -1), torch.ones(rows, prompt.shape[1], dtype=torch.long),
                      max_new_tokens=1, eos_ids=EOS, pad_id=PAD)
    counts = torch.bincount(output[:, -1], minlength=VOCAB)
    statistic, dof = _chi_square(counts, probs)
    bound = dof + 6 * math.sqrt(2 * dof)  # mean + 6 standard deviations of a chi-square with dof degrees
    assert statistic < bound
    # the bound has power: the same counts are far from a uniform distribution, temperature 1.1, a top-50 truncation
    assert _chi_square(counts, torch.full((VOCAB,), 1 / VOCAB))[0] > bound
    assert _chi_square(counts, torch.softmax(probs.log() / 1.1, -1))[0] > bound
    top50 = torch.zeros(VOCAB, dtype=torch.float64).scatter(0, probs.topk(50).indices, probs.topk(50).values)
    assert _chi_square(counts, top50 / top50.sum())[0] > bound


def test_samples_score_finite_with_gradients_and_are_padded_after_eos(model):
    ids, mask = _prompts(padded=True, rows=32)
    torch.manual_seed(5)
    output = generate(model, ids, mask, max_new_tokens=12, eos_ids=MANY_EOS, pad_id=PAD)
    assert not output.is_inference()  # an ordinary tensor, which a training step can save for backward
    response = output[:, ids.shape[1]:]
    response_mask = mask_through_first_eos(response, MANY_EOS)
    assert (response[~response_mask] == PAD).all() and (~response_mask).any()
    logprobs = token_logprobs(model, output, torch.cat([mask, response_mask.long()], dim=1), start=ids.shape[1])
    assert torch.isfinite(logprobs).all()
    logprobs[response_mask].sum().backward()
    model.zero_grad(set_to_none=True)


def test_a_peft_wrapped_model_samples_like_hf_generate():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_make("llama"), peft.LoraConfig(r=4, target_modules="all-linear")).eval()
    ids, mask = _prompts(padded=True, rows=16)
    torch.manual_seed(6)
    expected = _hf(model, ids, mask, MANY_EOS, 24, **SAMPLING)
    torch.manual_seed(6)
    assert torch.equal(generate(model, ids, mask, max_new_tokens=24, eos_ids=MANY_EOS, pad_id=PAD), expected)
