import json

import pytest

from opdplus.tasks import Example, get_task
from opdplus.tasks.toolcall import ToolCallTask


@pytest.mark.parametrize("name", ["arith", "toolcall"])
def test_gold_responses_verify_and_fit_the_token_budget(name):
    task = get_task(name)
    for example in task.examples("train", 300) + task.examples("test", 300):
        assert task.verify(example.response, example)
        assert len(example.response) + 1 <= task.max_new_tokens  # char-level: chars == tokens, +1 for EOS
        json.dumps(example.reference)  # references must be JSON-serialisable


@pytest.mark.parametrize("name", ["arith", "toolcall"])
def test_train_and_test_are_disjoint_and_deterministic(name):
    task = get_task(name)
    train = task.examples("train", 2000, seed=0)
    test = task.examples("test", 300, seed=0)
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    assert task.examples("train", 50, seed=3) == task.examples("train", 50, seed=3)
    assert task.examples("train", 50, seed=3) != task.examples("train", 50, seed=4)
    with pytest.raises(ValueError):
        task.examples("validation", 1)


def test_toolcall_splits_on_request_even_with_a_tool_list():
    task = ToolCallTask(tools_shown=3)
    requests = lambda split: {e.prompt.split("\n", 1)[1] for e in task.examples(split, 1000)}  # noqa: E731
    assert not requests("train") & requests("test")
    assert all(e.prompt.startswith("tools:") for e in task.examples("test", 20))


def test_arith_verify():
    task = get_task("arith")
    example = Example(prompt="37+45-12=", reference=70, response="37+45=82;82-12=70#70")
    assert task.verify("37+45=82;82-12=70#70", example)
    assert task.verify("wrong working#70 ", example)  # only the final answer counts
    assert task.verify("#1#70", example)  # the LAST marker counts
    assert not task.verify("37+45=82;82-12=71#71", example)
    assert not task.verify("70#71", example)
    for malformed in ["", "70", "#", "#70.0", "#7 0", "#70a", "#0x46", "#70#"]:
        assert not task.verify(malformed, example), malformed
    negative = Example(prompt="10-99+1=", reference=-88, response="")
    assert task.verify("#-88", negative) and not task.verify("#88", negative)


def test_toolcall_verify():
    task = get_task("toolcall")
    reference = {"name": "timer", "arguments": {"minutes": 15}}
    example = Example(prompt="timer for 15 minutes", reference=reference, response=json.dumps(reference))
    assert task.verify('{"name":"timer","arguments":{"minutes":15}}', example)
    assert task.verify(' {"arguments": {"minutes": 15.0}, "name": "timer"}\n', example)  # key order, spaces, 15 == 15.0
    wrong = [
        '{"name":"timer","arguments":{"minutes":16}}',
        '{"name":"timer","arguments":{"minutes":"15"}}',
        '{"name":"weather","arguments":{"minutes":15}}',
        '{"name":"timer","arguments":{"minutes":15,"extra":1}}',
        '{"name":"timer","arguments":{}}',
    ]
    malformed = [
        "",
        "timer(15)",
        '{"name":"timer","arguments":{"minutes":15}',
        '{"name":"timer","arguments":{"minutes":15}} trailing',
        '{"name":"timer","arguments":{"minutes":NaN}}',
        '[{"name":"timer","arguments":{"minutes":15}}]',
        '{"name":"timer","arguments":[15]}',
        '{"name":"timer","arguments":{"minutes":15},"id":1}',
        "{'name':'timer','arguments':{'minutes':15}}",  # Python literal, not JSON
    ]
    for completion in wrong + malformed:
        assert not task.verify(completion, example), completion


def test_toolcall_bool_is_not_a_number():
    task = get_task("toolcall")
    example = Example(prompt="", reference={"name": "f", "arguments": {"x": 1}}, response="")
    assert not task.verify('{"name":"f","arguments":{"x":true}}', example)


def test_get_task_unknown_name_lists_valid_tasks():
    with pytest.raises(ValueError, match="arith.*toolcall"):
        get_task("chess")


def test_arith_with_subtraction():
    from opdplus.tasks.arith import ArithTask

    task = ArithTask(ops="+-")
    examples = task.examples("train", 200)
    assert any(example.reference < 0 for example in examples)
    assert all(task.verify(example.response, example) for example in examples)
    assert max(len(example.response) for example in examples) + 1 <= task.max_new_tokens


def test_tasks_declare_their_tools_turns_and_files():
    """The abilities a trainer or evaluation relies on are declared by every task, not found by probing."""
    from pathlib import Path

    from opdplus.tasks.withtools import WithTools
    from opdplus.tools import load_tools

    fixtures = Path(__file__).parent / "fixtures"
    single_turn = {"arith": get_task("arith"), "toolcall": get_task("toolcall"), "mix": get_task("mix"),
                   "math": get_task("math", data=str(fixtures / "gsm8k_mini.jsonl")),
                   "tooluse": get_task("tooluse", data=str(fixtures / "bfcl_mini.json"))}
    for name, task in single_turn.items():
        assert (task.toolbox, task.max_turns, task.reads_files) == (None, 1, name in ("math", "tooluse")), name
    toolbox = load_tools("arithmetic")
    with_tools = WithTools(single_turn["math"], toolbox, max_turns=3)
    assert (with_tools.toolbox, with_tools.max_turns, with_tools.reads_files) == (toolbox, 3, True)
    records = with_tools.load("train")  # every record once, in file order, offered the tools
    assert [r.prompt for r in records] == [r.prompt for r in single_turn["math"].load("train")]
    assert all(r.tools == tuple(toolbox.schemas) for r in records)
    assert not WithTools(single_turn["arith"], toolbox).reads_files
