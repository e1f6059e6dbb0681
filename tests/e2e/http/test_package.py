"""The adapter's shape: an honest public API, and a CLI that does not need the `http` extra."""

from __future__ import annotations

import subprocess
import sys

import flowstore.adapters.http


def test_all_names_exist_and_have_docstrings() -> None:
    for name in flowstore.adapters.http.__all__:
        obj = getattr(flowstore.adapters.http, name)
        if isinstance(obj, type) or callable(obj):
            assert obj.__doc__, name


def test_the_cli_imports_no_web_framework() -> None:
    code = "import sys, flowstore.adapters.cli; sys.exit('fastapi' in sys.modules or 'uvicorn' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False, timeout=60).returncode == 0
