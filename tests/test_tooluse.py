import json
import os
import tempfile
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opdplus.tasks.data import load_records
from opdplus.tasks.tooluse import ToolUseTask, check_calls, gold_calls
from opdplus.tools import format_tools_plain, parse_calls

FIXTURES = Path(__file__).parent / "fixtures"
QUESTIONS = str(FIXTURES / "bfcl_mini.json")
RECORDS = {r["id"]: r for r in load_records(QUESTIONS, fields=["id", "question", "function"])}
ANSWERS = {r["id"]: r["ground_truth"] for r in load_records(str(FIXTURES / "bfcl_mini.answers.json"), fields=["id"])}


def check(record_id: str, calls) -> bool:
    completion = calls if isinstance(calls, str) else json.dumps(calls)
    return check_calls(completion, RECORDS[record_id]["function"], ANSWERS[record_id])


def call(name, **arguments):
    return {"name": name, "arguments": arguments}


HOTEL = {"city": "New York City", "check_in": "2024-06-03", "check_out": "2024-06-05", "rooms": 2}
CURRENCY = [
    call("convert_currency", amount=100.0, source="USD", target="EUR"),
    call("convert_currency", amount=250.0, source="GBP", target="JPY"),
]


# ---- checker verdicts -------------------------------------------------------------------


@pytest.mark.parametrize(
    "record_id, calls, expected",
    [
        # correct, with an int accepted for a float parameter
        ("mini_simple_0", [call("geometry.triangle_area", base=6, height=4.5)], True),
        ("mini_simple_0", [call("geometry.triangle_area", base=6.0, height=4.5, unit="cm")], True),
        # BFCL turns dots into underscores for some APIs
        ("mini_simple_0", [call("geometry_triangle_area", base=6, height=4.5)], True),
        ("mini_simple_0", [call("geometry.triangle_area", base=6, height=4.0)], False),  # wrong value
        (
            "mini_simple_0",
            [call("geometry.triangle_area", base=6, height=4.5, unit="mm")],
            False,
        ),  # wrong optional value
        ("mini_simple_0", [call("geometry.area", base=6, height=4.5)], False),  # wrong name
        ("mini_simple_0", [call("geometry.triangle_area", base=6)], False),  # missing required
        ("mini_simple_0", [call("geometry.triangle_area", base=6, height=4.5, color="red")], False),  # extra
        ("mini_simple_0", [call("geometry.triangle_area", base="6", height=4.5)], False),  # string for float
        ("mini_simple_0", [call("geometry.triangle_area", base=True, height=4.5)], False),  # bool for float
        ("mini_multiple_1", [call("hotel_booking", **HOTEL)], True),  # optional "breakfast" omitted, "" allowed
        ("mini_multiple_1", [call("hotel_booking", **{**HOTEL, "breakfast": False})], True),
        ("mini_multiple_1", [call("hotel_booking", **{**HOTEL, "breakfast": 0})], False),  # int for bool
        ("mini_multiple_1", [call("hotel_booking", **{**HOTEL, "rooms": 2.0})], False),  # float for integer
        ("mini_multiple_1", [call("hotel_booking", **{**HOTEL, "rooms": True})], False),  # bool for integer
        ("mini_multiple_1", [call("hotel_booking", **{k: v for k, v in HOTEL.items() if k != "rooms"})], False),
        # strings: case, whitespace and light punctuation are ignored; any allowed alternative counts
        ("mini_multiple_1", [call("hotel_booking", **{**HOTEL, "city": " new-york  CITY "})], True),
        ("mini_multiple_1", [call("hotel_booking", **{**HOTEL, "city": "NYC", "check_in": "06/03/2024"})], True),
        ("mini_multiple_1", [call("hotel_booking", **{**HOTEL, "city": "Boston"})], False),
        ("mini_multiple_1", [call("flights.search", origin="Boston", destination="New York")], False),
        ("mini_parallel_2", CURRENCY, True),
        ("mini_parallel_2", CURRENCY[::-1], True),  # parallel calls match in any order
        ("mini_parallel_2", [CURRENCY[0], CURRENCY[0]], False),  # one-to-one
        ("mini_parallel_2", CURRENCY[:1], False),  # too few calls
        ("mini_parallel_2", CURRENCY + CURRENCY[:1], False),  # too many calls
        ("mini_parallel_2", [], False),
        (
            "mini_parallel_multiple_3",
            [
                call("school_db.fetch", conditions={"department": "science", "school": "Hill"}),
                call("list_tools.sort", values=[3, 1, 2]),
            ],
            True,
        ),
        (
            "mini_parallel_multiple_3",
            [
                call("list_tools.sort", values=[1, 2, 3]),
                call("school_db.fetch", conditions={"department": "Science", "school": "Hill"}),
            ],
            False,
        ),
        (
            "mini_parallel_multiple_3",
            [call("list_tools.sort", values=[3, 1, 2]), call("school_db.fetch", conditions={"department": "Science"})],
            False,
        ),
        (
            "mini_parallel_multiple_3",
            [
                call("list_tools.sort", values=[3, 1, 2]),
                call("school_db.fetch", conditions={"department": "Science", "school": "Hill", "x": 1}),
            ],
            False,
        ),
        (
            "mini_parallel_multiple_3",
            [
                call("list_tools.sort", values=[3, 1.5, 2]),
                call("school_db.fetch", conditions={"department": "Science", "school": "Hill"}),
            ],
            False,
        ),
    ],
)
def test_checker_verdicts(record_id, calls, expected):
    assert check(record_id, calls) is expected


def test_checker_finds_a_matching_where_greedy_assignment_fails():
    functions = [
        {"name": "f", "parameters": {"type": "dict", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}
    ]
    ground_truth = [{"f": {"a": [1, 2]}}, {"f": {"a": [1]}}]  # the first accepts either call, the second only a=1
    assert check_calls("[f(a=1), f(a=2)]", functions, ground_truth)
    assert not check_calls("[f(a=2), f(a=2)]", functions, ground_truth)


def test_checker_accepts_python_syntax_and_tool_call_tags():
    assert check(
        "mini_parallel_2",
        "[convert_currency(amount=250, source='gbp', target='JPY'), "
        "convert_currency(amount=100, source='USD', target='EUR')]",
    )
    assert check("mini_simple_0", "geometry.triangle_area(base=6, height=4.5)")
    assert check("mini_parallel_2", "".join(f"<tool_call>\n{json.dumps(c)}\n</tool_call>\n" for c in CURRENCY))


# ---- parser -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion, expected",
    [
        ('{"name": "f", "arguments": {"a": 1}}', [call("f", a=1)]),
        ('{"name": "f", "parameters": {"a": [1, 2]}}', [call("f", a=[1, 2])]),
        ('[{"name": "f", "arguments": {}}, {"name": "g.h", "arguments": {"b": "x"}}]', [call("f"), call("g.h", b="x")]),
        ('{"type": "function", "function": {"name": "f", "arguments": "{\\"a\\": 1}"}}', [call("f", a=1)]),
        (
            (
                '<think>hmm</think>\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n'
                '<tool_call>{"name": "g", "arguments": {"b": 2}}</tool_call>'
            ),
            [call("f", a=1), call("g", b=2)],
        ),
        ('<tool_call>{"name": "f", "arguments": {"a": 1}}', [call("f", a=1)]),  # unclosed last block
        ("[f(a=1), g(b='x')]", [call("f", a=1), call("g", b="x")]),
        ("math.factorial(n=5)", [call("math.factorial", n=5)]),
        (
            "f(a=-1.5, b=(1, 2), c={'k': [None, True]}, d=true, e=null)",
            [call("f", a=-1.5, b=[1, 2], c={"k": [None, True]}, d=True, e=None)],
        ),
        ('```json\n{"name": "f", "arguments": {"a": 1}}\n```', [call("f", a=1)]),
        ("```python\n[f(a=1)]\n```", [call("f", a=1)]),
        ("[]", []),
    ],
)
def test_parse_calls_accepts(completion, expected):
    assert parse_calls(completion) == expected


@pytest.mark.parametrize(
    "completion",
    [
        "",
        "hello",
        "42",
        "[1, 2]",
        '{"arguments": {"a": 1}}',
        '{"name": "", "arguments": {}}',
        '{"name": "f", "arguments": [1]}',
        '{"name": "f", "arguments": {"a": NaN}}',
        "f(1)",
        "f(**kw)",
        "f(a=g())",
        "f(a=x)",
        "f(a=1+2)",
        "__import__('os').system('true')",
        "(lambda: 0)()",
        "f(a=1) + g(b=2)",
        "<tool_call>not json</tool_call>",
        "[f(a=1), 3]",
        "x" * 100_001,
    ],
)
def test_parse_calls_rejects(completion):
    assert parse_calls(completion) is None


# ---- the task --------------------------------------------------------------------------


def test_tooluse_task_loads_bfcl_files_and_its_gold_responses_verify():
    task = ToolUseTask(train_path=QUESTIONS, test_path=[QUESTIONS])  # answers found next to the questions
    examples = task.examples("test", 10, seed=0)
    assert len(examples) == 10 and examples == task.examples("test", 10, seed=0)
    for example in examples:
        assert task.verify(example.response, example)
        assert example.messages[-1]["content"] == example.prompt
        assert example.tools and example.reference["functions"] == list(example.tools)
        json.dumps(example.reference)
    hotel = next(e for e in examples if "hotel" in e.prompt)
    assert hotel.messages[0]["role"] == "system"
    assert json.loads(hotel.response) == [call("hotel_booking", **HOTEL)]  # "" first: breakfast left out
    with pytest.raises(ValueError, match="split must be"):
        task.examples("dev", 1)
    with pytest.raises(ValueError, match="no train data"):
        ToolUseTask(test_path=QUESTIONS).examples("train", 1)


def test_gold_calls_keep_required_and_drop_unknown_parameters():
    functions = [
        {"name": "f", "parameters": {"type": "dict", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}
    ]
    ground_truth = [{"f": {"a": ["", 3], "ghost": ["x", ""]}}]  # BFCL data has both quirks
    assert gold_calls(functions, ground_truth) == [call("f", a=3)]
    assert check_calls(json.dumps(gold_calls(functions, ground_truth)), functions, ground_truth)


def test_format_tools_plain_lists_signatures_and_descriptions():
    text = format_tools_plain(RECORDS["mini_parallel_multiple_3"]["function"])
    assert "list_tools.sort(values: array[integer], descending?: boolean)" in text
    assert "school_db.fetch(conditions: dict)" in text
    assert "- descending: Sort from largest to smallest. Default false." in text


# ---- fuzzing: nothing raises, nothing runs ---------------------------------------------

SENTINEL = os.path.join(tempfile.gettempdir(), f"opdplus_pwned_{uuid.uuid4().hex}")
PAYLOADS = [
    f"open({SENTINEL!r}, 'w')",
    f"__import__('os').system('touch {SENTINEL}')",
    f"exec(\"open({SENTINEL!r}, 'w')\")",
    f"eval(\"open({SENTINEL!r}, 'w')\")",
    f"f(a=open({SENTINEL!r}, 'w'))",
    f"[f(a=1), open({SENTINEL!r}, 'w').write('x')]",
    f"f(a=[x for x in [open({SENTINEL!r}, 'w')]])",
    f"f(a=(lambda: open({SENTINEL!r}, 'w'))())",
    f"{{'name': 'f', 'arguments': {{'a': open({SENTINEL!r}, 'w')}}}}",
    f'<tool_call>{{"name": "f", "arguments": {{"a": open({SENTINEL!r}, \'w\')}}}}</tool_call>',
    f"f(a=1) if open({SENTINEL!r}, 'w') else g(b=2)",
    "().__class__.__base__.__subclasses__()",
    "f(a=" * 300 + "1" + ")" * 300,
    "[" * 5000 + "]" * 5000,
    "{" * 3000 + "}" * 3000,
    '{"name": "f", "arguments": ' + '{"a": ' * 2000 + "1" + "}" * 2001,
    '[{"name": "f", "arguments": {"a": ' + "[" * 900 + "]" * 900 + "}}]",
    "f(a=" + "9" * 5000 + ")",
    '{"name": "f", "arguments": {"a": ' + "9" * 5000 + "}}",
    "f(a=1e99999, b=-1e99999)",
    '{"name": "f", "arguments": {"a": 1e99999}}',
    "f(a='\udcff\x00\u202e\ufeff')",
    "ｆ(ａ=１)",
    "f(a=1, a=2)",
    '{"name": "f", "arguments": {"a": 1, "a": 2}}',
    "<tool_call>" * 1000,
    "```" * 1000,
]
NAMES = st.sampled_from(["f", "g.h", "list_tools.sort", "school_db.fetch", "school_db_fetch", "__import__", "", "1x"])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**30), 10**30) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
JSON_CALLS = st.builds(
    lambda name, arguments, key: json.dumps({"name": name, key: arguments}),
    NAMES,
    st.dictionaries(st.sampled_from(["values", "descending", "conditions", "x"]), JSON_VALUES, max_size=4),
    st.sampled_from(["arguments", "parameters", "args"]),
)
PYTHON_CALLS = st.builds(
    lambda name, arguments: f"{name}(" + ", ".join(f"{k}={v!r}" for k, v in arguments.items()) + ")",
    NAMES,
    st.dictionaries(st.sampled_from(["values", "descending", "conditions"]), JSON_VALUES, max_size=3),
)
ATOMS = (
    st.sampled_from(PAYLOADS)
    | JSON_CALLS
    | PYTHON_CALLS
    | st.text(max_size=200)
    | st.text(alphabet="[](){}<>\"',:=.\\ _-0123456789abcfnrtuxel#*`", max_size=400)
)
COMPLETIONS = (
    ATOMS
    | st.lists(ATOMS, min_size=1, max_size=4).map(lambda parts: "[" + ", ".join(parts) + "]")
    | st.lists(ATOMS, min_size=1, max_size=3).map(lambda parts: "".join(f"<tool_call>{p}</tool_call>" for p in parts))
    | st.tuples(ATOMS, ATOMS).map("".join)
)
PARALLEL_MULTIPLE = RECORDS["mini_parallel_multiple_3"]["function"], ANSWERS["mini_parallel_multiple_3"]


@settings(
    max_examples=10_000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
@given(COMPLETIONS)
def test_fuzz_parse_and_check_never_raise_nor_execute(completion):
    calls = parse_calls(completion)
    if calls is not None:
        assert all(isinstance(c["name"], str) and isinstance(c["arguments"], dict) for c in calls)
    assert check_calls(completion, *PARALLEL_MULTIPLE) in (True, False)
    assert not os.path.exists(SENTINEL)


def test_payloads_never_execute():
    for payload in PAYLOADS:
        parse_calls(payload)
        check_calls(payload, *PARALLEL_MULTIPLE)
    assert not os.path.exists(SENTINEL)
