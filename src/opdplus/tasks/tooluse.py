"""Function calling in the BFCL format, graded like BFCL's AST checker.

A BFCL question record holds `id`, `question` (a list of turns, each a list of
chat messages) and `function` (JSON schemas whose `parameters.type` is "dict").
Its answer record holds `ground_truth`: one `{function_name: {param: [allowed
values]}}` per expected call, where `""` among the allowed values means the
parameter may be left out, and a dict inside an allowed value is itself a
`{key: [allowed values]}` spec.

Completions are untrusted model output, read by opdplus.tools.parsing (json and
ast only: no eval, exec or compile).
"""

import json
import os
import re
from collections.abc import Sequence
from typing import Any

from opdplus.tasks.base import SPLITS, Example
from opdplus.tasks.data import load_records, sample_cycled
from opdplus.tools.parsing import parse_calls

# BFCL: "New York, NY" == "new york ny"; only the space, not newline, tab or NBSP, is ignored.
IGNORED_IN_STRINGS = re.compile(r"[ ,./\-_*^]")


# ---- checking calls against the ground truth ----------------------------------------


def check_calls(completion: str, functions: list[dict], ground_truth: list[dict]) -> bool:
    """BFCL AST-checker verdict: the same number of calls, matched one-to-one in any order.

    BFCL's rules, followed here: strings compare without case, spaces and `,./-_*^`,
    with ' as " (a newline, tab or NBSP still counts); that loose comparison applies to a
    string parameter, to the items of an array and to the values of a dict (also a dict
    inside an array); strings deeper down (a list inside a dict value) must match exactly.
    An int stands for a float parameter, but not for a float inside an array. A Python
    tuple is accepted only where the schema says "tuple". Where the ground truth
    disagrees with the schema's type, the ground truth's type wins.

    Deliberate differences from BFCL: an optional array parameter (`""` among its
    allowed values) given as `[]` is wrong unless the ground truth lists `[]` itself:
    BFCL turns the `""` into `[]` by accident and so accepts it; leaving it out is
    the way to omit it. And the calls of a parallel answer match in any order by a
    true one-to-one matching, where BFCL's greedy matching rejects some orders.
    """
    calls = parse_calls(completion, keep_tuples=True)
    if calls is None or len(calls) != len(ground_truth):
        return False
    schemas = {function["name"]: function for function in functions}
    expected = [next(iter(answer.items())) for answer in ground_truth]  # [(name, {param: allowed})]
    fits = [[_call_matches(call, name, spec, schemas.get(name)) for call in calls] for name, spec in expected]
    return _has_perfect_matching(fits)


def _has_perfect_matching(fits: list[list[bool]]) -> bool:
    """Whether every expected call i gets its own model call j with fits[i][j] (Kuhn's algorithm).

    BFCL matches greedily; a proper matching also accepts orders where greedy picks wrongly.
    """
    owner: dict[int, int] = {}  # model call -> expected call it is assigned to

    def assign(i: int, tried: set[int]) -> bool:
        for j, fits_ij in enumerate(fits[i]):
            if fits_ij and j not in tried:
                tried.add(j)
                if j not in owner or assign(owner[j], tried):
                    owner[j] = i
                    return True
        return False

    return all(assign(i, set()) for i in range(len(fits)))


def _call_matches(call: dict, name: str, spec: dict, schema: dict | None) -> bool:
    # BFCL renames f.g to f_g for APIs that forbid dots in function names; accept both.
    if schema is None or call["name"] not in (name, name.replace(".", "_")):
        return False
    parameters = schema.get("parameters") or {}
    properties = parameters.get("properties") or {}
    arguments = call["arguments"]
    if any(required not in arguments for required in parameters.get("required") or ()):
        return False
    for param, value in arguments.items():
        if param not in properties or param not in spec:
            return False
        allowed = _alternatives(spec[param])
        if isinstance(value, tuple) and "tuple" in _alternatives(properties[param].get("type")):
            value = list(value)  # BFCL: a tuple only for a tuple parameter (elsewhere it matches nothing)
        if not _type_ok(value, properties[param], allowed):
            return False
        # "" means "may be omitted", so it is not a value a call can match.
        if not any(_value_matches(value, option) for option in allowed if option != ""):
            return False
    return all(param in arguments or "" in _alternatives(options) for param, options in spec.items())


def _alternatives(options: Any) -> list:
    return options if isinstance(options, list) else [options]  # tolerate a bare value


def _type_ok(value: Any, schema: dict, allowed: list) -> bool:
    if _conforms(value, schema):
        return True
    # Where the ground truth disagrees with the schema (a variable name for an integer, a
    # list of lists for a list of strings), the ground truth wins, as in BFCL.
    return any(type(value) is type(option) and not _conforms(option, schema) for option in allowed if option != "")


def _conforms(value: Any, schema: dict, in_array: bool = False) -> bool:
    kind = schema.get("type", "any")
    if isinstance(kind, list):  # JSON Schema unions such as ["string", "null"]
        return any(_conforms(value, {**schema, "type": k}, in_array) for k in kind)
    if kind == "integer":
        return type(value) is int  # bool is an int subclass but not an integer here
    if kind in ("float", "number"):
        # BFCL: an int stands for a float parameter, not for a float inside an array
        return type(value) is float or (type(value) is int and not in_array)
    if kind == "string":
        return isinstance(value, str)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "null":
        return value is None
    if kind in ("array", "tuple", "list"):
        items = schema.get("items")
        return isinstance(value, list) and (
            not isinstance(items, dict) or all(_conforms(v, items, in_array=True) for v in value)
        )
    if kind in ("dict", "object"):
        return isinstance(value, dict)
    return True  # "any", and types we do not know


def _value_matches(value: Any, option: Any, exact: bool = False) -> bool:
    """Whether a model value equals one allowed value (dicts there are nested specs).

    As in BFCL, strings compare loosely (_standardize) as a parameter, an array item or
    a dict value; `exact` (inside a list within a dict, or a list within a list) they
    must be equal.
    """
    if isinstance(option, dict):
        if not isinstance(value, dict):
            return False
        for key, item in value.items():
            if key not in option:
                return False
            alternatives = [o for o in _alternatives(option[key]) if o != ""]
            if not any(_value_matches(item, o, exact or isinstance(o, (list, dict))) for o in alternatives):
                return False
        return all(key in value or "" in _alternatives(options) for key, options in option.items())
    if isinstance(option, list):
        return (
            isinstance(value, list)
            and len(value) == len(option)
            and all(_value_matches(v, o, exact or isinstance(o, list)) for v, o in zip(value, option))
        )
    if isinstance(option, str):
        if exact:
            return value == option
        return isinstance(value, str) and _standardize(value) == _standardize(option)
    if isinstance(option, bool) or isinstance(value, bool):
        return type(value) is type(option) and value == option
    if isinstance(option, (int, float)):
        return isinstance(value, (int, float)) and value == option  # 5 == 5.0
    return value == option  # None


def _standardize(text: str) -> str:
    """Case, spaces and light punctuation do not matter, nor ' versus " (BFCL's standardize_string)."""
    return IGNORED_IN_STRINGS.sub("", text).lower().replace("'", '"')


# ---- gold calls ---------------------------------------------------------------------


def gold_calls(functions: list[dict], ground_truth: list[dict]) -> list[dict]:
    """The ground truth's first allowed values as calls that check_calls accepts.

    Leaves out a parameter whose first option is "" unless the schema requires it,
    and one the schema does not know (BFCL answers sometimes list those, optional).
    """
    schemas = {function["name"]: function for function in functions}
    calls = []
    for answer in ground_truth:
        name, spec = next(iter(answer.items()))
        parameters = (schemas.get(name) or {}).get("parameters") or {}
        properties, required = parameters.get("properties") or {}, parameters.get("required") or ()
        arguments = {}
        for param, options in spec.items():
            values = [option for option in _alternatives(options) if option != ""]
            keep = param in required or (param in properties and _alternatives(options)[0] != "")
            if keep and values:
                arguments[param] = _first_choice(values[0])
        calls.append({"name": name, "arguments": arguments})
    return calls


def _first_choice(option: Any) -> Any:
    if isinstance(option, dict):  # a nested spec: its first option per key, "" meaning leave out
        chosen = {}
        for key, options in option.items():
            first = _alternatives(options)[0]
            if first != "":
                chosen[key] = _first_choice(first)
        return chosen
    if isinstance(option, list):
        return [_first_choice(item) for item in option]
    return option


# ---- the task -----------------------------------------------------------------------

Paths = str | Sequence[str] | None


class ToolUseTask:
    """BFCL-format questions, one or more files per split, with their answer files.

    An answers path left as None is found next to the questions: `X.answers.json`
    for `X.json`, else `possible_answer/X.json` (BFCL's own layout); records that
    carry `ground_truth` themselves need no answer file.
    """

    name = "tooluse"
    toolbox = None  # single-turn
    max_turns = 1
    reads_files = True  # load(split): every record once, in file order

    def __init__(
        self,
        train_path: Paths = None,
        test_path: Paths = None,
        train_answers_path: Paths = None,
        test_answers_path: Paths = None,
        max_new_tokens: int = 256,
        teacher_field: str = "teacher",
    ):
        self.paths = {"train": _as_list(train_path), "test": _as_list(test_path)}
        self.teacher_field = teacher_field  # a record field naming its teacher, when several are configured
        self.answers_paths = {"train": _as_list(train_answers_path), "test": _as_list(test_answers_path)}
        for split in SPLITS:
            if self.answers_paths[split] and len(self.answers_paths[split]) != len(self.paths[split]):
                raise ValueError(f"{split}: give one answers path per questions path")
        self.max_new_tokens = max_new_tokens
        self._examples: dict[str, list[Example]] = {}

    def load(self, split: str) -> list[Example]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not self.paths[split]:
            raise ValueError(f"ToolUseTask has no {split} data: pass {split}_path=")
        if split not in self._examples:
            answers_paths = self.answers_paths[split] or [None] * len(self.paths[split])
            self._examples[split] = [
                example
                for path, answers_path in zip(self.paths[split], answers_paths)
                for example in _load_examples(path, answers_path, self.teacher_field)
            ]
        return self._examples[split]

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        return sample_cycled(self.load(split), n, seed=f"{self.name}/{split}/{seed}")

    def verify(self, completion: str, example: Example) -> bool:
        """A verdict, never an exception: the completion is untrusted model text."""
        try:
            return check_calls(completion, example.reference["functions"], example.reference["ground_truth"])
        except (RecursionError, ValueError, TypeError, MemoryError):
            return False


def _as_list(paths: Paths) -> list[str]:
    if paths is None:
        return []
    return [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)


def _load_examples(path: str, answers_path: str | None, teacher_field: str = "teacher") -> list[Example]:
    def check(record: dict) -> str | None:  # ground truth inside the questions file is checked there, by line
        embedded = answers_path is None and "ground_truth" in record
        return _question_problem(record) or (_answer_problem(record) if embedded else None)

    questions = load_records(path, fields=["id", "question", "function"], check=check)
    if answers_path is None and all("ground_truth" in record for record in questions):
        answers = {record["id"]: record["ground_truth"] for record in questions}
    else:
        answers_path = answers_path or _find_answers_path(path)
        answers = {r["id"]: r["ground_truth"]
                   for r in load_records(answers_path, fields=["id", "ground_truth"], check=_answer_problem)}
    examples = []
    for record in questions:
        if record["id"] not in answers:
            raise ValueError(f"{answers_path}: no ground truth for id {record['id']!r}")
        examples.append(_example(record, answers[record["id"]], record.get(teacher_field)))
    return examples


QUESTION_SHAPE = ("field 'question' must be a string or a list of turns, the first a non-empty list of "
                  "{\"role\": ..., \"content\": ...} messages with string values")
FUNCTION_SHAPE = ("field 'function' must be a list of JSON schemas, each an object with a string \"name\" and "
                  "\"parameters\" an object (its \"properties\" an object, its \"required\" a list)")
GROUND_TRUTH_SHAPE = ("field 'ground_truth' must be a list of calls, each an object {function_name: {parameter: "
                      "[allowed values]}} with exactly one key")


def _question_problem(record: dict) -> str | None:
    """What is wrong with a question record's shape (BFCL: `question` [[messages]], `function` [schemas]), so that
    it fails at loading with its line rather than as an IndexError or AttributeError in the middle of a run."""
    if _id_problem(record):
        return _id_problem(record)
    question = record["question"]
    if not isinstance(question, str):
        turn = question[0] if isinstance(question, list) and question else None
        if not (isinstance(turn, list) and turn and all(
                isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str) for message in turn)):
            return QUESTION_SHAPE
    functions = record["function"]
    if not isinstance(functions, list) or not all(_is_schema(function) for function in functions):
        return FUNCTION_SHAPE
    return None


def _is_schema(function) -> bool:
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        return False
    parameters = function.get("parameters", {})
    return parameters is None or (isinstance(parameters, dict)
                                  and isinstance(parameters.get("properties") or {}, dict)
                                  and isinstance(parameters.get("required") or [], list))


def _answer_problem(record: dict) -> str | None:
    """What is wrong with an answer record's `ground_truth` (the checker reads it as trusted data)."""
    ground_truth = record["ground_truth"]
    if not isinstance(ground_truth, list) or not all(
            isinstance(call, dict) and len(call) == 1 and isinstance(next(iter(call)), str)
            and isinstance(next(iter(call.values())), dict) for call in ground_truth):
        return GROUND_TRUTH_SHAPE
    return _id_problem(record)


def _id_problem(record: dict) -> str | None:
    record_id = record["id"]
    if isinstance(record_id, bool) or not isinstance(record_id, (str, int)):
        return "field 'id' must be a string or an integer"
    return None


def _find_answers_path(path: str) -> str:
    stem, extension = os.path.splitext(path)
    candidates = [
        f"{stem}.answers{extension}",
        os.path.join(os.path.dirname(path), "possible_answer", os.path.basename(path)),
    ]
    for candidate in candidates:
        if os.path.exists(candidate):
            return candidate
    raise FileNotFoundError(f"no answers file for {path}: tried {', '.join(candidates)}")


def _example(record: dict, ground_truth: list[dict], teacher: str | None = None) -> Example:
    question = record["question"]
    # BFCL: a list of turns, each a list of messages; these categories are single-turn.
    turn = [{"role": "user", "content": question}] if isinstance(question, str) else question[0]
    user_messages = [message["content"] for message in turn if message.get("role") == "user"]
    functions = record["function"]
    return Example(
        prompt=user_messages[-1] if user_messages else "",
        reference={"functions": functions, "ground_truth": ground_truth},
        response=json.dumps(gold_calls(functions, ground_truth), ensure_ascii=False),
        messages=tuple(dict(message) for message in turn),
        tools=tuple(functions),
        teacher=None if teacher is None else str(teacher),
        id=None if record.get("id") is None else str(record["id"]),
    )
