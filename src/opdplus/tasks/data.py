"""Load task records from local files (JSONL, JSON, Parquet) or, online, the HF hub.

Every error is one line naming the file and, where it makes sense, the line or
record: `data/gsm8k.jsonl:12: missing field 'answer'`.

Formats are told apart by content, not only by extension: BFCL ships JSONL
under a `.json` name, so a `.json` file that is not one JSON document is read
as JSONL.
"""

import json
import os
import random
import re
from collections.abc import Callable, Sequence
from typing import Any

# `owner/name`, optionally `:config` and `@split`, e.g. `openai/gsm8k:main@test`.
HUB_NAME = re.compile(r"^[\w.-]+(/[\w.-]+)?(:[\w.-]+)?(@[\w.-]+)?$")
LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")
SURROGATE = re.compile("[\ud800-\udfff]")  # JSON may escape half a UTF-16 pair; no tokenizer can encode it


def load_records(path: str, *, fields: Sequence[str], check: Callable[[dict], str | None] | None = None) -> list[dict]:
    """Records (dicts) from `path`, each checked to hold every name in `fields`, to hold only encodable text, and
    by `check` (which returns what is wrong with a record, or None), so that a bad record fails here, as
    `FILE:LINE: ...`, before a run writes anything."""
    path = os.fspath(path)
    if os.path.exists(path):
        if path.endswith(".parquet"):
            records, where = _read_parquet(path), _record_location
        else:
            records, where = _read_json_or_jsonl(path, fields)
    elif _looks_like_hub_name(path) and _datasets_installed():
        records, where = _read_hub(path), _record_location
    else:
        raise FileNotFoundError(f"data file not found: {path}")
    if not records:
        raise ValueError(f"no records in {path}")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"{where(path, index)}: expected a JSON object, got {type(record).__name__}")
        for name in fields:
            if name not in record:
                raise ValueError(f"{where(path, index)}: missing field {name!r}")
        problem = _lone_surrogate(record) or (check(record) if check else None)
        if problem:
            raise ValueError(f"{where(path, index)}: {problem}")
    return records


def text_field_problem(record: dict, name: str) -> str | None:
    """What is wrong with a field that must hold text: a non-empty string or a number (not a boolean)."""
    value = record[name]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or (isinstance(value, str)
                                                                               and not value.strip()):
        return f"field {name!r} must be a non-empty string or number"
    return None


def _lone_surrogate(record: dict) -> str | None:
    """The field holding a lone surrogate (`"\\ud800"` in JSON), which Python reads but no tokenizer encodes."""
    for name, value in record.items():
        if _holds_surrogate(name) or _holds_surrogate(value):
            return (f"field {str(name).encode('utf-8', 'backslashreplace').decode()!r} holds a lone surrogate "
                    "escape (\\ud800-\\udfff), which is not text: fix or drop the record")
    return None


def _holds_surrogate(value: Any) -> bool:
    stack = [value]
    while stack:  # iterative: a deeply nested record must not overflow the stack
        item = stack.pop()
        if isinstance(item, str):
            if SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return False


def sample_cycled(items: Sequence[Any], n: int, seed: str) -> list[Any]:
    """n items in a seeded random order, reshuffling and cycling when n > len(items)."""
    if not items:
        raise ValueError("cannot sample from an empty list")
    rng = random.Random(seed)  # a string seed gives the same stream in every process
    drawn: list[Any] = []
    while len(drawn) < n:
        order = list(items)
        rng.shuffle(order)
        drawn.extend(order[: n - len(drawn)])
    return drawn


def _record_location(path: str, index: int) -> str:
    return f"{path}: record {index + 1}"


def _read_json_or_jsonl(path: str, fields: Sequence[str]):
    """Records and a function naming where record i came from (line for JSONL)."""
    try:
        with open(path, encoding="utf-8-sig") as file:  # -sig: tolerate a byte-order mark
            text = file.read()
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    if not text.strip():
        raise ValueError(f"data file is empty: {path}")
    if not path.endswith(".jsonl"):
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            if error.msg != "Extra data":  # a broken document, not several JSONL documents
                raise ValueError(f"{path}:{error.lineno}: invalid JSON: {error.msg}") from None
            document = None  # several documents: read it as JSONL below
        except RecursionError:
            raise ValueError(f"{path}: invalid JSON: nested too deeply") from None
        if isinstance(document, list):
            return document, _record_location
        if isinstance(document, dict):
            # Either one record (a one-line JSONL file) or a wrapper such as {"data": [...]}.
            lists = [value for value in document.values() if isinstance(value, list)]
            is_record = all(name in document for name in fields)
            if not is_record and len(lists) == 1 and all(isinstance(item, dict) for item in lists[0]):
                return lists[0], _record_location
            return [document], lambda path, index: f"{path}:1"
    records, line_numbers = [], []
    # split on \n only: splitlines() would also split inside strings holding U+2028.
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except (ValueError, RecursionError) as error:
            message = getattr(error, "msg", None) or str(error) or type(error).__name__
            raise ValueError(f"{path}:{line_number}: invalid JSON: {message}") from None
        line_numbers.append(line_number)
    return records, lambda path, index: f"{path}:{line_numbers[index]}"


def _read_parquet(path: str) -> list[dict]:
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        parquet = None
    if parquet is not None:
        return parquet.read_table(path).to_pylist()
    try:
        import datasets
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    return list(datasets.Dataset.from_parquet(path))


def _looks_like_hub_name(path: str) -> bool:
    return bool(HUB_NAME.match(path)) and not path.endswith(LOCAL_SUFFIXES)


def _datasets_installed() -> bool:
    try:
        import datasets  # noqa: F401
    except ImportError:
        return False
    return True


def _read_hub(name: str) -> list[dict]:
    """`owner/name[:config][@split]` from the HF hub (needs internet; split defaults to train)."""
    import datasets

    name, _, split = name.partition("@")
    name, _, config = name.partition(":")
    return list(datasets.load_dataset(name, config or None, split=split or "train"))
