"""Optional parts say which extra they need when its libraries are missing."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _without(module: str, code: str) -> subprocess.CompletedProcess[str]:
    # sys.modules[name] = None makes `import name` fail as if it were not installed.
    script = f"import sys; sys.modules[{module!r}] = None\n{code}"
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("missing", ["yaml", "httpx"])
def test_providers_name_the_providers_extra(missing: str) -> None:
    done = _without(missing, "import flowstore.adapters.providers")
    assert done.returncode != 0
    assert "pip install 'flowstore-es[providers]'" in done.stderr
    assert f"({missing} is missing)" in done.stderr


def test_the_command_line_names_the_cli_extra() -> None:
    done = _without(
        "rich",
        "from flowstore.adapters.cli import main; sys.exit(main(['--url', 'memory://', 'flows', 'list']))",
    )
    assert done.returncode != 0
    assert "flowstore-es[cli]" in done.stderr + done.stdout


def test_the_library_alone_needs_none_of_them() -> None:
    code = (
        "import sys\n"
        "for name in ('rich', 'yaml', 'httpx', 'fastapi', 'kafka'): sys.modules[name] = None\n"
        "from flowstore.testing import linear_flow, memory_store\n"
        "with memory_store() as store:\n"
        "    store.create_flow(linear_flow('f'))\n"
        "    print(store.execute_transition('ann', 'f', 'next').step)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "s1", done.stderr
