"""The README's examples run: every ```python block of the sections listed here, each on its own."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"

# Sections whose examples are complete programs. (Others show fragments: the Alembic `env.py` lines
# are checked by tests/integration/test_alembic.py, which adds them to a generated env.py.)
RUNNABLE = {
    "Using flowstore in an asyncio app",
    "The HTTP API inside your FastAPI app",
    "Reacting to flows",
}


def python_blocks(text: str) -> list[tuple[str, str]]:
    """(heading, code) for each ```python block, under the nearest heading above it."""
    blocks, heading = [], ""
    # Fenced blocks are matched whole, so that a `# comment` inside one is not taken for a heading.
    for match in re.finditer(r"^#{1,6} ([^\n]+)$|^```(\w*)\n(.*?)^```$", text, re.M | re.S):
        if match.group(1) is not None:
            heading = match.group(1).strip()
        elif match.group(2) == "python":
            blocks.append((heading, match.group(3)))
    return blocks


EXAMPLES = [(h, code) for h, code in python_blocks(README.read_text()) if h in RUNNABLE]


def test_every_runnable_section_has_an_example() -> None:
    assert {heading for heading, _ in EXAMPLES} == RUNNABLE


@pytest.mark.parametrize(("heading", "code"), EXAMPLES, ids=[h for h, _ in EXAMPLES])
def test_the_example_runs(heading: str, code: str, tmp_path: Path) -> None:
    ran = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,  # examples open relative SQLite files
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert ran.returncode == 0, f"{heading}:\n{ran.stderr}"
    if heading == "Reacting to flows":
        assert ran.stdout.splitlines() == ["completed: ann"]
