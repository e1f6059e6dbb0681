"""README.md stays true: every Python block runs (twice, as a reader re-running it would), and
every shell line names a make target, an extra or a `flowstore` command that exists."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"^```(\w*)\n(.*?)^```$", README, flags=re.MULTILINE | re.DOTALL)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]


def test_the_readme_has_python_blocks() -> None:
    assert len(PYTHON) >= 2


@pytest.mark.parametrize("code", PYTHON, ids=[f"block{i}" for i in range(len(PYTHON))])
def test_every_python_block_runs_twice(
    code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the default store is ./flowstore.db
    for name in ("FLOWSTORE_URL", "FLOWSTORE_KAFKA_BOOTSTRAP", "FLOWSTORE_CIPHER_KEY"):
        monkeypatch.delenv(name, raising=False)
    for _ in range(2):  # a second run meets the first one's database
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})


def _shell_lines() -> list[list[str]]:
    lines = []
    for lang, code in BLOCKS:
        if lang != "bash":
            continue
        for line in code.splitlines():
            command = line.split("#", 1)[0].strip()
            if command:
                lines.append(shlex.split(command))
    return lines


def test_every_shell_line_names_what_exists() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([\w-]+):", makefile, flags=re.MULTILINE))
    extras = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    )
    lines = _shell_lines()
    assert lines
    for words in lines:
        if words[0] == "make":
            assert set(words[1:]) <= targets, words
        elif words[:3] == ["pip", "install", "-e"]:
            named = re.fullmatch(r"\.(?:\[(.*)\])?", words[3])
            assert named is not None, words
            assert set(filter(None, (named.group(1) or "").split(","))) <= extras, words
        elif (
            words[0].endswith("python") and words[1] == "-m" and words[2].startswith("benchmarks.")
        ):
            assert (ROOT / "benchmarks" / f"{words[2].split('.', 1)[1]}.py").exists(), words
        else:
            raise AssertionError(f"a README shell line this test does not know: {words}")
