"""The recipes of docs/testing-with-pytunnel.md, run exactly as written (via pytester)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

DOC = Path(__file__).resolve().parent.parent / "docs" / "testing-with-pytunnel.md"
RECIPES = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


def test_the_doc_has_recipes() -> None:
    assert len(RECIPES) == 3


@pytest.mark.parametrize("index", range(len(RECIPES)))
def test_recipe(pytester: pytest.Pytester, index: int) -> None:
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    pytester.makepyfile(**{f"test_recipe_{index}": RECIPES[index]})
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
