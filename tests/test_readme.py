"""README.md must stay true: its recipe reference and its test command."""

import re
from pathlib import Path

from lmforge.config import recipe_reference

ROOT = Path(__file__).resolve().parents[1]


def test_recipe_reference_in_readme_is_current():
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- recipe-reference:start -->\n(.*?)\n<!-- recipe-reference:end -->", readme, re.S)
    assert found, "README.md lost its recipe reference markers"
    assert found.group(1) == recipe_reference(), "regenerate README's recipe reference with `lmforge recipe --reference`"


def test_ci_runs_the_readme_test_command():
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if "pytest" in line]
    assert len(ci_lines) == 1
    assert ci_lines[0] in (ROOT / "README.md").read_text()


def test_default_recipe_is_valid_and_time_bounded():
    from lmforge.config import load_recipe

    recipe = load_recipe("default")
    assert recipe.data.sources == ["stdlib"] and recipe.train.max_minutes is not None
