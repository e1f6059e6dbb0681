"""The @owlmeans/flow fixtures (tests/fixtures/owlmeans, produced by the real library): where they are
and the standard flows as fresh dicts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).parent / "fixtures" / "owlmeans"
"""The folder: `_oa.json`, `_oidc.json`, `_oidp.json`, `_stb.json`, `tokens.json`, ..."""


def owl_flow(name: str) -> dict[str, Any]:
    """One of the model's standard flows (`_oa`, `_oidc`, `_oidp`, `_stb`), a fresh copy."""
    data: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text(encoding="utf-8"))
    return data
