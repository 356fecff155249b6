"""Chunked log-probs: equal to the full-logits computation (values and gradients) and to the distribution
`generate` actually sampled from, left padding included."""

import torch
import pytest
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from opdplus.logprobs import _full_logits_logprobs, position_ids_from_mask, shared_prompt_logprobs, token_logprobs
from opdplus.rollout import left_pad


def tiny_model(seed=0, vocab=50, kind="llama"):
    torch.manual_seed(seed)
    if kind == "gpt2":  # absolute position embeddings: left padding changes them unless positions follow the mask
        config = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=0,
                            eos_token_id=1, bos_token_id=None, initializer_range=0.3)
        return GPT2LMHeadModel(config).eval()
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         pad_token_id=0, eos_token_id=1, bos_token_id=None, initializer_range=0.3)
    return LlamaForCausalLM(config).eval()


def left_padded_batch():
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    input_ids, attention_mask = left_pad(prompts, pad_id=0)
    responses = torch.tensor([[20, 21, 22, 1], [23, 1, 0, 0], [24, 25, 26, 27]])
    response_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]])
    return torch.cat([input_ids, responses], 1), torch.cat([attention_mask, response_mask], 1), input_ids.shape[1]


def test_chunked_equals_full_logits_values_and_gradients():
    model = tiny_model()
    input_ids, attention_mask, start = left_padded_batch()
    chunked = token_logprobs(model, input_ids, attention_mask, start=start, max_logit_elements=3 * 50)  # 3 tokens a chunk
    chunked.sum().backward()
    chunked_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    full = _full_logits_logprobs(model, input_ids, attention_mask, position_ids_from_mask(attention_mask), start)
    full.sum().backward()
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    for chunked_grad, parameter in zip(chunked_grads, model.parameters()):
        torch.testing.assert_close(chunked_grad, parameter.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_scores_equal_the_distribution_generate_sampled_from(kind):
    model = tiny_model(seed=1, kind=kind)
    prompt_ids, prompt_mask = left_pad([[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]], pad_id=0)
    torch.manual_seed(0)
    output = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True, top_k=0, top_p=1.0,
                            temperature=1.0, max_new_tokens=6, pad_token_id=0, eos_token_id=1,
                            output_logits=True, return_dict_in_generate=True)
    start = prompt_ids.shape[1]
    responses = output.sequences[:, start:]
    generated_logprobs = torch.stack(
        [torch.log_softmax(logits.float(), -1).gather(-1, responses[:, t, None]).squeeze(-1)
         for t, logits in enumerate(output.logits)], 1)
    alive = (torch.cumsum((responses == 1).long(), 1) - (responses == 1).long()) == 0  # through the first EOS
    attention_mask = torch.cat([prompt_mask, alive.long()], 1)
    with torch.no_grad():
        scored = token_logprobs(model, output.sequences, attention_mask, start=start)
    torch.testing.assert_close(scored[alive], generated_logprobs[alive], rtol=1e-4, atol=1e-4)
    if kind == "gpt2":  # scoring with positions 0..L-1 would not match for left-padded rows
        with torch.no_grad():
            naive = model(output.sequences, attention_mask=attention_mask,
                          position_ids=torch.arange(attention_mask.shape[1])[None]).logits[:, start - 1 : -1]
        naive = torch.log_softmax(naive.float(), -1).gather(-1, responses[..., None]).squeeze(-1)
        assert (naive[alive] - generated_logprobs[alive]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_shared_prompts_equal_whole_rows_values_and_gradients(kind):
    # 3 prompts of different lengths (left-padded), 2 right-padded responses each; GPT-2 has absolute positions
    model = tiny_model(seed=2, kind=kind)
    prompt_ids, prompt_mask = left_pad([[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]], pad_id=0)
    prompt_index = torch.tensor([0, 0, 1, 1, 2, 2])
    response_ids = torch.tensor([[20, 21, 22, 1], [23, 1, 0, 0], [24, 25, 26, 27], [28, 0, 0, 0],
                                 [29, 30, 1, 0], [31, 32, 33, 1]])
    response_mask = (response_ids != 0).long()
    shared = shared_prompt_logprobs(model, prompt_ids, prompt_mask, prompt_index, response_ids, response_mask)
    (shared * response_mask).sum().backward()
    shared_grads = [parameter.grad.clone() for parameter in model.parameters()]
    model.zero_grad()
    rows = torch.cat([prompt_ids[prompt_index], response_ids], 1)
    mask = torch.cat([prompt_mask[prompt_index], response_mask], 1)
    whole = token_logprobs(model, rows, mask, start=prompt_ids.shape[1], share_prompts=False)
    (whole * response_mask).sum().backward()
    real = response_mask.bool()
    torch.testing.assert_close(shared[real], whole[real], rtol=0, atol=1e-5)
    for shared_grad, parameter in zip(shared_grads, model.parameters()):
        torch.testing.assert_close(shared_grad, parameter.grad, rtol=1e-4, atol=1e-5)
    # token_logprobs finds the repeated prompts itself; with gradient checkpointing (no KV cache in training)
    # it falls back to whole rows
    with torch.no_grad():
        torch.testing.assert_close(token_logprobs(model, rows, mask, start=prompt_ids.shape[1])[real], whole[real],
                                   rtol=0, atol=1e-5)
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    model.train()  # as the trainer does it: no dropout, train mode only to switch checkpointing on
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    torch.testing.assert_close(token_logprobs(model, rows, mask, start=prompt_ids.shape[1])[real],
                               whole[real].detach(), rtol=0, atol=1e-5)
