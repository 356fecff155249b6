"""Tool calling: pick the right tool for a short request and fill in its arguments.

The catalogue has five tools (weather, timer, call, play, translate). Models are
char-level and every prompt token costs compute in each distillation step, so by
default the prompt is just the request; `ToolCallTask(tools_shown=3)` prefixes a
line listing the right tool and two distractors:

    tools:play,weather,timer
    will it rain in kalomi?

Gold response, one compact JSON call:

    {"name":"weather","arguments":{"city":"kalomi"}}

The model must map the phrasing to a tool, copy arguments out of the request
(place, number, name...) and, for `translate`, map a language name to its code.
"""

import json
import random
from dataclasses import dataclass
from typing import Any, Callable

from opdplus.tasks.base import Example, sample_split

# Cities and contacts are made-up names built from syllables: with ~400k possible names
# the model cannot memorise request -> call pairs and has to learn to copy the argument.
# (With a list of 30 real cities a 3-layer model reached zero train loss but only ~87%
# on held-out requests.)
CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
GENRES = "jazz rock pop blues folk metal disco soul funk reggae techno opera salsa punk".split()
WORDS = "hello thanks water bread friend cheese house apple night music".split()
LANGUAGES = {"french": "fr", "german": "de", "spanish": "es", "italian": "it", "dutch": "nl", "polish": "pl"}


@dataclass(frozen=True)
class Tool:
    name: str
    phrasings: tuple[str, ...]  # request templates, filled from the drawn arguments
    draw_arguments: Callable[[random.Random], tuple[dict[str, str], dict[str, Any]]]
    # -> (values for the request template, the JSON arguments of the call)


def made_up_name(rng: random.Random) -> str:
    return "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(rng.randint(2, 3)))


def _weather(rng):
    city = made_up_name(rng)
    return {"city": city}, {"city": city}


def _timer(rng):
    minutes = rng.randint(1, 999)
    return {"minutes": str(minutes)}, {"minutes": minutes}


def _call(rng):
    contact = made_up_name(rng)
    return {"contact": contact}, {"contact": contact}


def _play(rng):
    genre = rng.choice(GENRES)
    return {"genre": genre}, {"genre": genre}


def _translate(rng):
    word, language = rng.choice(WORDS), rng.choice(sorted(LANGUAGES))
    return {"text": word, "language": language}, {"text": word, "lang": LANGUAGES[language]}


TOOLS = (
    Tool("weather", ("weather in {city}?", "is it cold in {city}?", "forecast for {city}", "will it rain in {city}?"), _weather),
    Tool("timer", ("set a timer for {minutes} min", "timer for {minutes} minutes", "wake me in {minutes} min", "countdown {minutes} minutes"), _timer),
    Tool("call", ("call {contact}", "phone {contact} please", "ring {contact}", "get {contact} on the phone"), _call),
    Tool("play", ("play some {genre}", "put on {genre} music", "i want to hear {genre}", "play {genre} please"), _play),
    Tool("translate", ("say {text} in {language}", "{text} in {language}?", "translate {text} to {language}", "how is {text} said in {language}?"), _translate),
)


def format_call(name: str, arguments: dict[str, Any]) -> str:
    return json.dumps({"name": name, "arguments": arguments}, separators=(",", ":"))


def _reject_constant(token: str):
    raise ValueError(f"non-standard JSON constant {token}")


def _same_value(a: Any, b: Any) -> bool:
    """JSON value equality where 2 == 2.0 but True != 1 (Python's == conflates bool and int)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_value(a[key], b[key]) for key in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


class ToolCallTask:
    name = "toolcall"
    max_new_tokens = 72  # longest gold response is 62 chars + EOS
    toolbox = None  # single-turn
    max_turns = 1
    reads_files = False

    def __init__(self, tools_shown: int = 0):
        if not 0 <= tools_shown <= len(TOOLS):
            raise ValueError(f"tools_shown must be in [0, {len(TOOLS)}]")
        self.tools_shown = tools_shown  # 0: no tool list line in the prompt

    def _draw(self, rng: random.Random) -> tuple[str, Example]:
        tool = rng.choice(TOOLS)
        template_values, arguments = tool.draw_arguments(rng)
        request = rng.choice(tool.phrasings).format(**template_values)
        prompt = request
        if self.tools_shown:
            shown = rng.sample([t.name for t in TOOLS if t is not tool], self.tools_shown - 1) + [tool.name]
            rng.shuffle(shown)
            prompt = "tools:" + ",".join(shown) + "\n" + request
        reference = {"name": tool.name, "arguments": arguments}
        # Split on the request alone, so test requests are unseen whatever tools are listed.
        return request, Example(prompt=prompt, reference=reference, response=format_call(tool.name, arguments))

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        return sample_split(self.name, split, n, seed, self._draw)

    def verify(self, completion: str, example: Example) -> bool:
        # json.loads only, never eval: completions are untrusted model output.
        try:
            call = json.loads(completion.strip(), parse_constant=_reject_constant)
        except (ValueError, RecursionError):  # JSONDecodeError is a ValueError; '[' * 5000 is too deep
            return False
        if not (isinstance(call, dict) and call.keys() == {"name", "arguments"}):
            return False
        if not (isinstance(call["name"], str) and isinstance(call["arguments"], dict)):
            return False
        reference = example.reference
        return call["name"] == reference["name"] and _same_value(call["arguments"], reference["arguments"])
