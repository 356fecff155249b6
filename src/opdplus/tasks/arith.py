"""Multi-step arithmetic: `37+45+12=` answered as `37+45=82;82+12=94#94`.

The gold response works left to right, one operation per step, then gives the final
answer after `#`. Three two-digit operands keep responses at most 24 characters (the
models are char-level, and every token costs compute during distillation) while still
needing carries. `ArithTask(ops="+-")` mixes in subtraction (and negative numbers);
it is markedly slower to learn, so the packaged models use the default "+".
"""

import random
import re

from opdplus.tasks.base import Example, sample_split

INTEGER = re.compile(r"[+-]?\d+")


def _apply(left: int, op: str, right: int) -> int:
    return left + right if op == "+" else left - right


class ArithTask:
    name = "arith"
    max_new_tokens = 32  # longest gold response is 24 chars (26 with ops="+-") + EOS
    toolbox = None  # single-turn
    max_turns = 1
    reads_files = False

    def __init__(self, n_operands: int = 3, low: int = 10, high: int = 99, ops: str = "+"):
        self.ops = ops
        self.n_operands = n_operands
        self.low = low
        self.high = high

    def _draw(self, rng: random.Random) -> tuple[str, Example]:
        operands = [rng.randint(self.low, self.high) for _ in range(self.n_operands)]
        ops = [rng.choice(self.ops) for _ in range(self.n_operands - 1)]
        prompt = str(operands[0]) + "".join(op + str(x) for op, x in zip(ops, operands[1:])) + "="
        steps, value = [], operands[0]
        for op, x in zip(ops, operands[1:]):
            new_value = _apply(value, op, x)
            steps.append(f"{value}{op}{x}={new_value}")
            value = new_value
        response = ";".join(steps) + f"#{value}"
        return prompt, Example(prompt=prompt, reference=value, response=response)

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        return sample_split(self.name, split, n, seed, self._draw)

    def verify(self, completion: str, example: Example) -> bool:
        # Only the final answer counts: the text after the last '#' must be exactly one integer.
        if "#" not in completion:
            return False
        answer = completion.rsplit("#", 1)[1].strip()
        if not INTEGER.fullmatch(answer) or len(answer) > 100:  # int() refuses > 4,300 digits; no answer is that long
            return False
        return int(answer) == int(example.reference)
