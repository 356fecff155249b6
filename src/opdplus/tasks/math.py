"""Math word problems (GSM8K and friends) graded by math-verify.

A reference is whatever the data set stores: a GSM8K solution ending in
`#### 72`, a MATH-style solution with `\\boxed{...}`, or a bare value. A completion
is graded on its final answer: the last `\\boxed{}` if any (failing that, all the
boxes as one set, as math-verify reads them), else the first line after the last
`####`, else whatever math-verify extracts from the text ("the answer is 18", or
the last number). math-verify then compares the two as mathematical
objects, so `1,000` == `1000` and `0.5` == `\\frac{1}{2}`.

Safety: the LaTeX side is parsed by a grammar, and math-verify hands sympy's
`parse_expr` only strings its regexes reduced to digits and arithmetic operators.
Parsing mostly does not evaluate (`2^2^2^2^2` stays a tree; binomials are the
exception, and \\Gamma of a number); evaluation happens in `verify`, so we refuse towers, huge exponents,
factorials and binomials before it. In the main thread math-verify's own SIGALRM
timeouts are a second line of defence; other threads cannot use signals, so there
these checks are the only one.
"""

import math
import re
import threading
from functools import lru_cache

import sympy
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from opdplus.tasks.base import SPLITS, Example
from opdplus.tasks.data import load_records, sample_cycled, text_field_problem

GSM8K_SUFFIX = "\nSolve step by step, then give the final answer after ####."
TIMEOUT_SECONDS = 3  # per parse / verify call; signal-based, so main thread only
MAX_COMPLETION_CHARS = 20_000  # longer completions are graded on their tail
MAX_EXPONENT = 10_000  # sympy evaluates 10^10000 in milliseconds, 9^9^9 never
MAX_COMBINATORIAL_ARG = 1_000  # n! and binomials grow as fast as towers

# Boxed answers first (priority 0), then math-verify's anchored and unanchored patterns.
COMPLETION_TARGETS = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())
REFERENCE_TARGETS = (LatexExtractionConfig(), ExprExtractionConfig())
THOUSANDS = re.compile(r"^-?\d{1,3}(,\d{3})+(\.\d+)?$")
EAGER_COMMAND = re.compile(r"\\(?:[dt]?binom|choose|Gamma|operatorname\s*\{\s*Gamma)")
BIG_OPERAND = re.compile(r"\d{5,}|\^")  # binom(10^5, 5*10^4) already takes half a second
CALCULATOR_ANNOTATION = re.compile(r"<<[^<>]*>>")  # GSM8K's `<<16-3-4=9>>` markup
COMBINATORIAL = (sympy.factorial, sympy.factorial2, sympy.subfactorial, sympy.binomial, sympy.gamma)


def extract_reference(reference: str) -> str:
    """The final answer stored in a reference: after `####`, inside the last `\\boxed{}`, or as is."""
    reference = str(reference)
    if "####" in reference:
        answer = reference.rpartition("####")[2].strip()
    elif "\\boxed" in reference:
        answer = _last_boxed_content(reference)
    else:
        answer = reference.strip()
    if THOUSANDS.match(answer):
        answer = answer.replace(",", "")  # GSM8K writes 1,000; LaTeX would read a comma as a list
    return answer


def _last_boxed_content(text: str) -> str:
    """Content of the last `\\boxed{...}`, matching nested braces; the text itself if unclosed."""
    start = text.rfind("\\boxed")
    brace = text.find("{", start)
    if brace == -1:
        return text[start + len("\\boxed") :].strip()  # `\boxed 5`
    depth = 0
    for index in range(brace, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[brace + 1 : index].strip()
    return text.strip()


def is_correct(completion: str, reference: str) -> bool:
    """Whether the completion's final answer equals the reference's. Never raises, and returns in bounded time
    in any thread (the checks before parse and verify do not rely on math-verify's signal-based timeouts)."""
    try:
        gold = _parse_reference(str(reference))
        if not gold or not all(_cheap_to_evaluate(value) for value in gold):
            return False
        return any(_answer_matches(final, gold) for final in _final_answers(str(completion)[-MAX_COMPLETION_CHARS:]))
    except BaseException as error:  # math-verify's TimeoutException derives from BaseException
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            raise
        return False


@lru_cache(maxsize=8192)  # the same reference is graded once per sampled completion
def _parse_reference(reference: str) -> tuple:
    answer = extract_reference(reference)
    if "$" not in answer:
        answer = f"${answer}$"  # read the bare answer as LaTeX, so x^2 or \sqrt{2} parse too
    if _evaluated_while_parsing(answer):
        return ()
    return tuple(parse(answer, extraction_config=REFERENCE_TARGETS, parsing_timeout=_timeout()))


def _final_answers(completion: str):
    """The text holding the final answer: from the last box on, then (when there are several boxes) the whole
    text, which math-verify alone reads as one set (`\\boxed{2}` and `\\boxed{3}` = {2, 3});
    else the first line after the last `####` (words after it are not the answer); else the whole text."""
    if "\\boxed" in completion:
        yield completion[completion.rfind("\\boxed") :]
        if completion.count("\\boxed") > 1:
            yield completion
    elif "####" in completion:
        yield completion.rpartition("####")[2].strip().partition("\n")[0]
    else:
        yield completion


def _answer_matches(final: str, gold: tuple) -> bool:
    if _evaluated_while_parsing(final):
        return False
    predicted = parse(final, extraction_config=COMPLETION_TARGETS, parsing_timeout=_timeout())
    if not predicted or not all(_cheap_to_evaluate(value) for value in predicted):
        return False
    return bool(verify(list(gold), predicted, timeout_seconds=_timeout()))  # a list: a tuple reads as one value


def _evaluated_while_parsing(text: str) -> bool:
    """The LaTeX parser evaluates binomials and \\Gamma of numbers eagerly, before any of our checks."""
    return bool(EAGER_COMMAND.search(text) and BIG_OPERAND.search(text))


def _timeout() -> int | None:
    # math-verify times out with signal.alarm, which only the main thread may use.
    return TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None


def _cheap_to_evaluate(value) -> bool:
    """False for power towers, huge exponents and huge factorials, which verify would try to evaluate."""
    if not isinstance(value, sympy.Basic):
        return True  # strings (math-verify's fallback) and matrices compare cheaply
    for node in sympy.preorder_traversal(value):
        if isinstance(node, sympy.Pow):
            exponent = node.exp
            if exponent.has(sympy.Pow, *COMBINATORIAL) or _upper_bound(exponent) > MAX_EXPONENT:
                return False
        elif isinstance(node, COMBINATORIAL) and max(map(_upper_bound, node.args), default=0.0) > MAX_COMBINATORIAL_ARG:
            return False  # (10^9)! as well as 1000000000!
    return True


def _upper_bound(expression) -> float:
    """An upper bound of |value| (a symbol counts as 1; inf past a float), so `(10^9)!` is seen as huge."""
    if isinstance(expression, sympy.Number):
        try:
            return abs(float(expression)) if expression.is_finite else math.inf
        except (OverflowError, TypeError):
            return math.inf
    bounds = [_upper_bound(argument) for argument in expression.args]
    try:
        if isinstance(expression, sympy.Add):
            bound = sum(bounds)
        elif isinstance(expression, sympy.Mul):
            bound = math.prod(bounds)
        elif isinstance(expression, sympy.Pow):
            bound = max(bounds[0], 1.0) ** bounds[1]
        elif isinstance(expression, COMBINATORIAL):
            largest = max(bounds, default=0.0)
            bound = math.inf if largest > 170 else math.gamma(largest + 2)
        else:
            bound = max(bounds, default=1.0)
    except OverflowError:
        return math.inf
    return math.inf if math.isnan(bound) else bound


class MathTask:
    """Word problems from a JSONL/JSON/Parquet file per split, e.g. GSM8K.

    The prompt is the question plus `prompt_suffix` (by default, ask for the final
    answer after `####`, the GSM8K convention). The reference is the raw answer
    field; the gold response is that solution without GSM8K's `<<...>>` calculator
    markup (a bare-value reference becomes `#### value`).
    """

    name = "math"
    toolbox = None  # single-turn
    max_turns = 1
    reads_files = True  # load(split): every record once, in file order

    def __init__(
        self,
        train_path: str | None = None,
        test_path: str | None = None,
        question_field: str = "question",
        answer_field: str = "answer",
        max_new_tokens: int = 512,
        prompt_suffix: str = GSM8K_SUFFIX,
        teacher_field: str = "teacher",
    ):
        self.paths = {"train": train_path, "test": test_path}
        self.question_field, self.answer_field = question_field, answer_field
        self.max_new_tokens = max_new_tokens
        self.prompt_suffix = prompt_suffix
        self.teacher_field = teacher_field  # a record field naming its teacher, when several are configured
        self._examples: dict[str, list[Example]] = {}

    def load(self, split: str) -> list[Example]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if self.paths[split] is None:
            raise ValueError(f"MathTask has no {split} data: pass {split}_path=")
        if split not in self._examples:
            fields = [self.question_field, self.answer_field]
            # null, a list or "" would otherwise be trained on as the text "None", "[]" or nothing
            records = load_records(self.paths[split], fields=fields, check=lambda record: next(
                filter(None, (text_field_problem(record, name) for name in fields)), None))
            self._examples[split] = [self._example(record) for record in records]
        return self._examples[split]

    def _example(self, record: dict) -> Example:
        reference = str(record[self.answer_field])
        if "####" in reference or "\\boxed" in reference:
            response = CALCULATOR_ANNOTATION.sub("", reference)
        else:
            response = f"#### {reference.strip()}"
        prompt = str(record[self.question_field]) + self.prompt_suffix
        teacher = record.get(self.teacher_field)
        record_id = record.get("id")
        return Example(prompt=prompt, reference=reference, response=response,
                       teacher=None if teacher is None else str(teacher),
                       id=None if record_id is None else str(record_id))

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        return sample_cycled(self.load(split), n, seed=f"{self.name}/{split}/{seed}")

    def verify(self, completion: str, example: Example) -> bool:
        return is_correct(completion, example.reference)
