"""Multi-turn tool rollouts: the task's functions answer parsed calls, their results are appended as tool
messages that both models read but the loss and the advantage sums skip.

The loop's logic is tested with a scripted policy (generate_responses replaced by a function of the context,
so the calls are certain); the same code then runs one real training step on tiny random models."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opdplus.objective.advantages import token_advantages
from opdplus.config import TrainConfig
from opdplus.objective.loss import opd_loss
from opdplus.logprobs import token_logprobs
from opdplus.rollout import conversation, hf, left_pad, mask_through_first_eos, render_conversation
from opdplus.rollout.engine import make_engine
from opdplus.tasks.base import Example
from opdplus.tasks.withtools import WithTools
from opdplus.teachers import get_teacher, score_sequences
from opdplus.teachers.routing import TeacherRouter
from opdplus.tools import TOOL_SETS, ToolBox, load_tools
from opdplus.trainer import train

TOOL_TEMPLATE = (
    "{% if tools %}<|user|>tools:{% for tool in tools %}{{ tool['name'] }};{% endfor %}{% endif %}"
    "{% for message in messages %}{% if message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}<|end|>\n"
    "{% elif message['role'] == 'tool' %}<|user|>result: {{ message['content'] }}\n"
    "{% else %}<|user|>{{ message['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CALL = '{"name": "multiply", "arguments": {"a": 6, "b": 7}}'


@pytest.fixture(scope="module")
def tool_models(models, tmp_path_factory):
    """The shared tiny random student and teacher, with a chat template that renders tool messages."""
    root = tmp_path_factory.mktemp("tool-models")
    paths = {}
    for name in ("student", "teacher"):
        tokenizer = AutoTokenizer.from_pretrained(models[name])
        tokenizer.chat_template = TOOL_TEMPLATE
        model = AutoModelForCausalLM.from_pretrained(models[name])
        paths[name] = str(root / name)
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    return paths


@pytest.fixture(scope="module")
def student(tool_models):
    return (AutoModelForCausalLM.from_pretrained(tool_models["student"]).eval(),
            AutoTokenizer.from_pretrained(tool_models["student"]))


def scripted(tokenizer, policy, calls_seen=None):
    """A stand-in for generate_responses whose turn is `policy(context text)`, followed by EOS unless the
    policy returns (text, False)."""

    def generate_responses(model, prompts, *, max_new_tokens, eos_ids, pad_id, **sampling):
        prompt_ids, prompt_mask = left_pad(prompts, pad_id)
        turns = []
        for prompt in prompts:
            reply = policy(tokenizer.decode(prompt))
            text, ends = reply if isinstance(reply, tuple) else (reply, True)
            turns.append(tokenizer(text, add_special_tokens=False)["input_ids"] + ([eos_ids[0]] if ends else []))
        width = max(len(turn) for turn in turns)
        response_ids = torch.full((len(turns), width), pad_id)
        for row, turn in enumerate(turns):
            response_ids[row, : len(turn)] = torch.tensor(turn)
        mask = mask_through_first_eos(response_ids, eos_ids) & (torch.arange(width) < torch.tensor(
            [len(turn) for turn in turns])[:, None])
        return prompt_ids, prompt_mask, response_ids, mask

    return generate_responses


def calculator_policy(context):
    return "#### 42" if "result:" in context else CALL


def examples():
    return [Example(prompt="6 times 7?", reference="42", response="#### 42"),
            Example(prompt="what is 6*7", reference="42", response="#### 42")]


def test_tool_results_are_appended_read_by_the_model_and_masked_out(student, monkeypatch):
    model, tokenizer = student
    monkeypatch.setattr(hf, "generate_responses", scripted(tokenizer, calculator_policy))
    toolbox = load_tools("arithmetic")
    task_examples = WithTools(_Fixed(examples()), toolbox).examples("train", 2)
    rollouts = hf.sample_with_tools(model, tokenizer, task_examples, toolbox, max_turns=3, num_samples=2,
                                    max_new_tokens=64)
    assert rollouts.prompt_index == [0, 0, 1, 1]
    assert rollouts.completions == ["#### 42"] * 4
    for row in range(4):
        assert rollouts.transcripts[row] == [{"role": "assistant", "content": CALL},
                                             {"role": "tool", "name": "multiply", "content": "42"},
                                             {"role": "assistant", "content": "#### 42"}]
        real = rollouts.attention_mask[row].bool()
        # the row reads exactly like the whole conversation rendered in one piece (the template's final
        # newline after the last <|end|> is not part of the rollout)
        messages, tools = conversation(task_examples[rollouts.prompt_index[row]])
        whole = render_conversation(tokenizer, messages + rollouts.transcripts[row], tools, add_generation_prompt=False)
        assert tokenizer.decode(rollouts.input_ids[row][real]) == whole.removesuffix("\n")
        # the loss sees exactly the sampled tokens; the environment's tokens are read but not trained on
        response = rollouts.response_ids[row]
        region = rollouts.attention_mask[row, rollouts.prompt_length :].bool()
        sampled, environment = rollouts.response_mask[row], region & ~rollouts.response_mask[row]
        assert tokenizer.decode(response[sampled]) == CALL + "<|end|>" + "#### 42<|end|>"
        assert tokenizer.decode(response[environment]) == "\n<|user|>result: 42\n<|assistant|>"
        assert not (rollouts.response_mask[row] & ~region).any()


class _Fixed:
    name, max_new_tokens = "fixed", 64
    toolbox, max_turns, reads_files = None, 1, False

    def __init__(self, items):
        self.items = items

    def examples(self, split, n, seed=0):
        return self.items[:n]

    def verify(self, completion, example):
        return completion.strip() == f"#### {example.reference}"


def test_the_hf_engine_runs_the_tool_loop_when_the_task_has_tools(student, monkeypatch):
    model, tokenizer = student
    monkeypatch.setattr(hf, "generate_responses", scripted(tokenizer, calculator_policy))
    task = WithTools(_Fixed(examples()), load_tools("arithmetic"), max_turns=3)
    rollouts = make_engine("hf", model, tokenizer, task).generate(task.examples("train", 2), num_samples=2,
                                                                  max_new_tokens=64)
    assert rollouts.completions == ["#### 42"] * 4 and [len(t) for t in rollouts.transcripts] == [3] * 4
    single = make_engine("hf", model, tokenizer, _Fixed(examples())).generate(examples(), num_samples=1,
                                                                             max_new_tokens=64)
    assert single.transcripts is None and single.completions == [CALL] * 2  # no tools: one turn, nothing called


def test_turn_limit_truncated_turns_and_tool_errors(student, monkeypatch):
    model, tokenizer = student
    always_calls = scripted(tokenizer, lambda context: CALL)
    monkeypatch.setattr(hf, "generate_responses", always_calls)
    toolbox = load_tools("arithmetic")
    one = hf.sample_with_tools(model, tokenizer, examples()[:1], toolbox, max_turns=1, max_new_tokens=64)
    assert [m["role"] for m in one.transcripts[0]] == ["assistant"]  # one turn: nothing is called
    two = hf.sample_with_tools(model, tokenizer, examples()[:1], toolbox, max_turns=2, max_new_tokens=64)
    assert [m["role"] for m in two.transcripts[0]] == ["assistant", "tool", "assistant"]
    # a turn cut off before its EOS is not executed, even if it parses
    monkeypatch.setattr(hf, "generate_responses", scripted(tokenizer, lambda context: (CALL, False)))
    cut = hf.sample_with_tools(model, tokenizer, examples()[:1], toolbox, max_turns=3, max_new_tokens=64)
    assert len(cut.transcripts[0]) == 1
    # unknown tools and failing calls become messages for the model, not errors of the run
    bad = '[{"name": "launch", "arguments": {}}, {"name": "divide", "arguments": {"a": 1, "b": 0}}]'
    monkeypatch.setattr(hf, "generate_responses",
                        scripted(tokenizer, lambda context: "#### 0" if "result:" in context else bad))
    errors = hf.sample_with_tools(model, tokenizer, examples()[:1], toolbox, max_turns=3, max_new_tokens=64)
    results = [m["content"] for m in errors.transcripts[0] if m["role"] == "tool"]
    assert results[0].startswith("error: unknown tool 'launch'") and results[1] == "error: ZeroDivisionError: division by zero"


def test_tool_tokens_are_scored_in_context_but_carry_no_loss_or_credit(student, tool_models, monkeypatch):
    model, tokenizer = student
    monkeypatch.setattr(hf, "generate_responses", scripted(tokenizer, calculator_policy))
    rollouts = hf.sample_with_tools(model, tokenizer, examples(), load_tools("arithmetic"), max_turns=3,
                                    max_new_tokens=64)
    mask = rollouts.response_mask
    region = rollouts.attention_mask[:, rollouts.prompt_length :].bool()
    teacher = TeacherRouter({"default": get_teacher(tool_models["teacher"])})
    teacher_logprobs = teacher.score(rollouts, [None, None])
    assert (teacher_logprobs[region] < 0).all() and (teacher_logprobs[~region] == 0).all()  # tools scored in place
    # the teacher's log-prob of the answer is the one given the tool result: equal to scoring the row whole
    row = rollouts.input_ids[0][rollouts.attention_mask[0].bool()]
    whole = score_sequences(get_teacher(tool_models["teacher"]), [row.tolist()])[0]
    assert torch.allclose(whole[-int(region[0].sum()):], teacher_logprobs[0][region[0]], atol=1e-5)

    student_logprobs = token_logprobs(model, rollouts.input_ids, rollouts.attention_mask,
                                      start=rollouts.prompt_length).detach()
    for gamma in (0.0, 1.0):
        advantages = token_advantages(student_logprobs, teacher_logprobs, mask, divergence="fkl", gamma=gamma)
        changed = teacher_logprobs.clone()
        changed[region & ~mask] -= 5.0  # the tool tokens' scores must not matter
        assert (advantages[region & ~mask] == 0).all()
        assert torch.equal(advantages, token_advantages(student_logprobs, changed, mask, divergence="fkl", gamma=gamma))
    # nor the loss: a different teacher score on a tool token leaves it as it was
    loss = opd_loss(student_logprobs, teacher_logprobs, mask, divergence="jsd")[0]
    assert loss == opd_loss(student_logprobs, changed, mask, divergence="jsd")[0]


def test_one_training_step_with_tools(tool_models, tmp_path, monkeypatch):
    """The trainer runs the tool loop (here the scripted calls), trains on the sampled tokens and logs them."""
    tokenizer = AutoTokenizer.from_pretrained(tool_models["student"])
    calls = []

    def policy(context):
        calls.append(context)
        return "#### 42" if "result:" in context else '{"name": "add", "arguments": {"a": 40, "b": 2}}'

    monkeypatch.setattr(hf, "generate_responses", scripted(tokenizer, policy))
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i} + 42 - {i}?", "answer": "#### 42"}) + "\n" for i in range(4)))
    config = TrainConfig(task="math", data=str(data), test_data=str(data), tools="arithmetic", max_tool_turns=3,
                         student=tool_models["student"], teacher=tool_models["teacher"], out=str(tmp_path / "run"),
                         steps=1, prompts_per_step=2, samples_per_prompt=2, max_new_tokens=48, eval_every=1,
                         eval_examples=2, tensorboard=False, divergence="fkl")
    train(config, progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[1]["sample_accuracy"] == 1.0 and records[1]["greedy_accuracy"] == 1.0
    sampled = len(tokenizer('{"name": "add", "arguments": {"a": 40, "b": 2}}')["input_ids"]) + 1 + len("#### 42") + 1
    assert records[1]["response_length"] == sampled  # the tool result's tokens are not counted as trained
    assert any("tools:add;subtract;multiply;divide;" in context for context in calls)


def test_toolbox_schemas_and_errors():
    toolbox = ToolBox(TOOL_SETS["arithmetic"])
    multiply = next(schema for schema in toolbox.schemas if schema["name"] == "multiply")
    assert multiply["parameters"]["required"] == ["a", "b"] and "Multiply" in multiply["description"]
    assert toolbox.call("multiply", {"a": 6, "b": 7}) == "42"
    assert toolbox.call("divide", {"a": 1, "b": 4}) == "0.25"
    assert toolbox.call("add", {"a": 1}).startswith("error: TypeError")
    assert toolbox.call("add", [1, 2]) == "error: arguments must be an object of named parameters"
    assert toolbox.call(["add"], {}).startswith("error: unknown tool")
    assert toolbox.call("add", {"a": "__import__('os')", "b": 1}).startswith("error: TypeError")  # data, not code

    def undocumented(x):
        return x

    with pytest.raises(ValueError, match="tool 'undocumented' needs type hints"):
        ToolBox([undocumented])
    with pytest.raises(ValueError, match="neither a built-in set"):
        load_tools("calculator")
    with pytest.raises(ValueError, match="cannot load 'opdplus.tools:nothing'"):
        load_tools("opdplus.tools:nothing")
    with pytest.raises(ValueError, match="non-empty list"):
        load_tools("opdplus.tools:MAX_RESULT_CHARS")
    with pytest.raises(ValueError, match="hf rollout backend only"):
        TrainConfig(tools="arithmetic", rollout_backend="vllm").validate()
