import warnings

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaForCausalLM
from transformers.generation import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from opdplus.models import load_model_and_tokenizer, resolve_model
from opdplus.rollout import render_prompt
from opdplus.rollout.evaluation import evaluate
from opdplus.rollout.hf import sample
from opdplus.tasks import get_task
from opdplus.tiny import TINY_MODELS, build_char_tokenizer, tiny_config

PROMPTS = ["1+2=", "weather in kalomi?", "ab"]  # different lengths, so left padding shows


def random_model(tokenizer, eos_bias: float = 3.0):
    """A random 1-layer Llama whose EOS logit is boosted, so rows end at varied positions."""
    torch.manual_seed(0)
    config = tiny_config(len(tokenizer), 1, 32, 2, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config).eval()
    bias = torch.zeros(len(tokenizer))
    bias[tokenizer.eos_token_id] = eos_bias
    model.lm_head.register_forward_hook(lambda module, inputs, logits: logits + bias)
    return model


def check_rollouts(rollouts, tokenizer, prompts, num_samples):
    n, total = rollouts.input_ids.shape
    P = rollouts.prompt_length
    T = total - P
    assert n == len(prompts) * num_samples
    assert rollouts.attention_mask.shape == (n, P + T) and rollouts.response_mask.shape == (n, T)
    assert rollouts.prompt_index == [i for i in range(len(prompts)) for _ in range(num_samples)]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    for row in range(n):
        # Prompt: left-padded, real tokens flush against the response.
        prompt_ids = tokenizer(render_prompt(tokenizer, prompts[rollouts.prompt_index[row]]), add_special_tokens=False)["input_ids"]
        n_pad = P - len(prompt_ids)
        assert rollouts.input_ids[row, n_pad:P].tolist() == prompt_ids
        assert rollouts.attention_mask[row, :P].tolist() == [0] * n_pad + [1] * len(prompt_ids)
        assert (rollouts.input_ids[row, :n_pad] == pad).all()
        # Response: mask covers everything up to and including the first EOS, padding after.
        response = rollouts.input_ids[row, P:].tolist()
        mask = rollouts.response_mask[row].tolist()
        length = response.index(eos) + 1 if eos in response else T
        assert mask == [True] * length + [False] * (T - length)
        assert all(token == pad for token in response[length:])
        assert rollouts.attention_mask[row, P:].tolist() == [int(m) for m in mask]
        assert rollouts.completions[row] == tokenizer.decode(response[:length], skip_special_tokens=True)
    return rollouts


def test_sample_shapes_padding_and_masks():
    tokenizer = build_char_tokenizer()
    rollouts = sample(random_model(tokenizer), tokenizer, PROMPTS, num_samples=8, max_new_tokens=12)
    check_rollouts(rollouts, tokenizer, PROMPTS, 8)
    lengths = rollouts.response_mask.sum(1)
    assert (lengths < 12).any() and (lengths == 12).any()  # some rows stopped early, some ran to the limit


def test_sample_when_pad_equals_eos():
    tokenizer = build_char_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    rollouts = check_rollouts(sample(random_model(tokenizer), tokenizer, PROMPTS, num_samples=8, max_new_tokens=12), tokenizer, PROMPTS, 8)
    eos = tokenizer.eos_token_id
    ended = [row for row in range(len(rollouts.completions)) if (rollouts.input_ids[row, rollouts.prompt_length :] == eos).any()]
    assert ended
    for row in ended:  # the first EOS (== pad) is inside the mask, the padding EOSs after it are not
        response = rollouts.input_ids[row, rollouts.prompt_length :]
        first = (response == eos).nonzero()[0].item()
        assert rollouts.response_mask[row, first] and not rollouts.response_mask[row, first + 1 :].any()


def test_greedy_is_deterministic_and_independent_of_batching():
    tokenizer = build_char_tokenizer()
    model = random_model(tokenizer, eos_bias=0.0)
    batched = sample(model, tokenizer, PROMPTS, max_new_tokens=8, greedy=True)
    for i, prompt in enumerate(PROMPTS):
        alone = sample(model, tokenizer, [prompt], max_new_tokens=8, greedy=True)
        assert alone.completions[0] == batched.completions[i]


def test_prompt_truncation_keeps_the_end():
    tokenizer = build_char_tokenizer()
    rollouts = sample(random_model(tokenizer), tokenizer, ["0123456789"], max_new_tokens=2, max_prompt_length=5)
    assert rollouts.prompt_length == 5
    assert rollouts.input_ids[0, :5].tolist() == tokenizer("6789<|assistant|>", add_special_tokens=False)["input_ids"]


def capture_generate_kwargs(model, monkeypatch):
    captured = {}
    original = model.generate

    def spy(*args, **kwargs):
        captured.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    return captured


def logits_processors(model, generate_kwargs):
    """The processors generate() would build from these kwargs (on top of the model's defaults)."""
    options = {k: v for k, v in generate_kwargs.items() if k not in ("input_ids", "attention_mask")}
    generation_config, _ = model._prepare_generation_config(None, **options)
    return list(model._get_logits_processor(generation_config))


def test_exact_sampling_runs_the_lean_loop_not_generate(monkeypatch):
    """generate() is not even called for exact (or greedy) sampling, so none of its defaults can apply."""
    tokenizer = build_char_tokenizer()
    model = random_model(tokenizer)
    captured = capture_generate_kwargs(model, monkeypatch)
    sample(model, tokenizer, PROMPTS, max_new_tokens=4)
    sample(model, tokenizer, PROMPTS, max_new_tokens=4, greedy=True)
    assert captured == {}


def test_modified_sampling_passes_every_parameter_to_generate(monkeypatch):
    tokenizer = build_char_tokenizer()
    model = random_model(tokenizer)
    captured = capture_generate_kwargs(model, monkeypatch)
    with pytest.warns(UserWarning, match="not from p_θ"):
        sample(model, tokenizer, PROMPTS, max_new_tokens=4, top_p=0.9)
    assert captured["do_sample"] is True
    assert (captured["top_k"], captured["top_p"], captured["temperature"]) == (0, 0.9, 1.0)
    processors = logits_processors(model, captured)
    assert [type(p) for p in processors if isinstance(p, (TopKLogitsWarper, TopPLogitsWarper))] == [TopPLogitsWarper]
    assert not [p for p in processors if isinstance(p, TemperatureLogitsWarper)]
    # Sanity check of the check: transformers 5.x's own default would have added top-k=50.
    defaults = {k: v for k, v in captured.items() if k not in ("top_k", "top_p", "temperature")}
    assert any(isinstance(p, TopKLogitsWarper) and p.top_k == 50 for p in logits_processors(model, defaults))


def test_top_k_none_does_not_fall_back_to_generate_default(monkeypatch):
    tokenizer = build_char_tokenizer()
    model = random_model(tokenizer)
    captured = capture_generate_kwargs(model, monkeypatch)
    with pytest.warns(UserWarning, match="not from p_θ"):
        sample(model, tokenizer, PROMPTS, max_new_tokens=2, top_k=None, temperature=0.7)
    assert captured["top_k"] == 0


def test_warns_when_samples_are_not_from_the_policy():
    tokenizer = build_char_tokenizer()
    model = random_model(tokenizer)
    for options in ({"top_k": 50}, {"top_p": 0.9}, {"temperature": 0.7}):
        with pytest.warns(UserWarning, match="not from p_θ"):
            sample(model, tokenizer, PROMPTS, max_new_tokens=2, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        sample(model, tokenizer, PROMPTS, max_new_tokens=2)
        sample(model, tokenizer, PROMPTS, max_new_tokens=2, greedy=True, top_k=50)  # greedy ignores sampling options


def test_evaluate_restores_training_mode():
    tokenizer = build_char_tokenizer()
    model = random_model(tokenizer)
    task = get_task("arith")
    examples = task.examples("test", 6)
    model.train()
    metrics = evaluate(model, tokenizer, task, examples, k=2, batch_size=4)
    assert model.training
    assert 0.0 <= metrics["greedy_accuracy"] <= 1.0 and 0.0 <= metrics["avg_at_k"] <= 1.0
    sample(model, tokenizer, PROMPTS, max_new_tokens=2)
    assert model.training
    model.eval()
    assert evaluate(model, tokenizer, task, examples)["avg_at_k"] is None
    assert not model.training


def test_resolve_model():
    assert resolve_model("Qwen/Qwen3-0.6B") == "Qwen/Qwen3-0.6B"
    assert resolve_model("/some/local/dir") == "/some/local/dir"
    with pytest.raises(ValueError, match="unknown tiny model 'tiny:xyz'; available: tiny:arith-teacher"):
        resolve_model("tiny:xyz")


@pytest.mark.parametrize("name", TINY_MODELS)
def test_committed_tiny_models_are_float32_safetensors_that_load(name):
    path = resolve_model(f"tiny:{name}")
    with safe_open(f"{path}/model.safetensors", framework="pt") as weights:
        assert {weights.get_slice(key).get_dtype() for key in weights.keys()} == {"F32"}
    model, tokenizer = load_model_and_tokenizer(f"tiny:{name}")
    assert model.dtype == torch.float32 and model.config.model_type == "llama"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    task = get_task(name.split("-")[0])
    examples = task.examples("test", 16)
    accuracy = evaluate(model, tokenizer, task, examples)["greedy_accuracy"]
    if name.endswith("teacher"):
        assert accuracy >= 0.8
