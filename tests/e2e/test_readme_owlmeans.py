"""The README's OwlMeans section: its Python example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).parents[2] / "README.md"


def owlmeans_blocks() -> list[str]:
    """The ```python blocks of the README's "The OwlMeans model" section."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## The OwlMeans model\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


def test_the_owlmeans_example_runs() -> None:
    blocks = owlmeans_blocks()
    assert blocks, "the section has an example"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {"__name__": "readme"})
