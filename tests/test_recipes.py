"""The shipped recipes are valid configs (every key known, every value accepted)."""

from pathlib import Path

import pytest

from opdplus.cli import load_yaml_config
from opdplus.config import TrainConfig

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda path: path.name)
def test_recipe_is_a_valid_config(path):
    config = TrainConfig(**load_yaml_config(path)).validate()
    assert config.temperature == 1.0 and config.top_k == 0 and config.top_p == 1.0  # exact on-policy sampling


def test_there_are_recipes_for_math_and_tool_use():
    assert {TrainConfig(**load_yaml_config(path)).task for path in RECIPES} >= {"math", "tooluse"}
