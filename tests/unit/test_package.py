"""The package's shape: a sorted, honest public API and a domain that imports no infrastructure."""

from __future__ import annotations

import subprocess
import sys

import flowstore


def test_all_is_sorted_and_every_name_exists() -> None:
    names = [n for n in flowstore.__all__ if n != "__version__"]
    assert names == sorted(names)
    for name in flowstore.__all__:
        assert hasattr(flowstore, name), name


def test_public_names_have_docstrings() -> None:
    for name in flowstore.__all__:
        obj = getattr(flowstore, name)
        if isinstance(obj, type):
            assert obj.__doc__, name


def test_contract_names_are_exported() -> None:
    contract = {
        "FlowStore", "FlowDefinition", "FlowState", "FlowStateHistory", "FlowStatistics",
        "FlowError", "FlowNotFoundError", "InvalidTransitionError", "FlowStateCorruptionError",
        "ConcurrencyConflictError", "DefinitionError", "PayloadValidationError",
    }  # fmt: skip
    assert contract <= set(flowstore.__all__)


def test_errors_are_flow_errors_and_fitting_builtins() -> None:
    assert issubclass(flowstore.FlowNotFoundError, LookupError)
    for error in (
        flowstore.InvalidTransitionError,
        flowstore.DefinitionError,
        flowstore.PayloadValidationError,
    ):
        assert issubclass(error, ValueError)
    for name in flowstore.__all__:
        obj = getattr(flowstore, name)
        if isinstance(obj, type) and name.endswith("Error"):
            assert issubclass(obj, flowstore.FlowError), name


def test_domain_modules_import_no_infrastructure() -> None:
    code = (
        "import sys, flowstore.domain, flowstore.decisions, flowstore.definitions, flowstore.inputs,"
        " flowstore.models, flowstore.views, flowstore.projections.ops;"
        "print(sorted(m for m in ('sqlalchemy', 'psycopg', 'kafka', 'fastapi', 'httpx', 'uvicorn',"
        " 'eventsourcing', 'cryptography') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
