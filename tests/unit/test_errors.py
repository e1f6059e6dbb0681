"""The error tree: one place, one map to HTTP status and exit code, and every error pickles."""

from __future__ import annotations

import inspect
import pickle
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import pytest

import flowstore.errors
from flowstore import FlowError, FlowNotFoundError, InvalidTransitionError
from flowstore.adapters.errors import known_codes, mapping_for


def _subclasses(cls: type[FlowError]) -> list[type[FlowError]]:
    found: list[type[FlowError]] = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


def _all_errors() -> list[type[FlowError]]:
    # Import every module that could define one, so that __subclasses__ sees them all.
    import flowstore.adapters.http
    import flowstore.adapters.http.console.routes
    import flowstore.adapters.kafka.commands
    import flowstore.store  # noqa: F401

    return sorted({FlowError, *_subclasses(FlowError)}, key=lambda cls: cls.__name__)


def _example(cls: type[FlowError]) -> FlowError:
    """An instance built through the class's own constructor, with plausible arguments."""
    arguments: dict[str, Any] = {}
    positional: list[Any] = []
    for name, parameter in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or parameter.kind in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL):
            continue
        if parameter.default is not parameter.empty:
            continue
        value: Any = {
            "errors": [{"loc": ["body", "x"], "msg": "bad"}],
            "problems": ["first problem", "second problem"],
            "attempts": 3,
            "size": 10,
            "limit": 5,
            "version": 2,
            "definition_version": 1,
        }.get(name, f"<{name}>")
        if parameter.kind is parameter.KEYWORD_ONLY:
            arguments[name] = value
        else:
            positional.append(value)
    return cls(*positional, **arguments)


def test_every_error_is_defined_in_flowstore_errors_and_drawn_in_its_tree() -> None:
    tree = flowstore.errors.__doc__ or ""
    for cls in _all_errors():
        assert cls.__module__ == "flowstore.errors", cls
        assert cls.__name__ in tree, cls
        assert cls.__name__ in flowstore.errors.__all__, cls


def test_every_error_code_has_its_own_http_status_and_exit_code() -> None:
    codes = known_codes()
    for cls in _all_errors():
        if cls is FlowError:
            continue
        assert cls.code in codes, f"{cls.__name__}: {cls.code} has no entry in adapters/errors.py"
        mapping = mapping_for(_example(cls))
        assert 400 <= mapping.http_status < 600
        assert mapping.exit_code not in (0, 2)  # 2 is argparse's usage error


@pytest.mark.parametrize("cls", _all_errors(), ids=lambda cls: cls.__name__)
def test_every_error_pickles_as_itself(cls: type[FlowError]) -> None:
    error = _example(cls)
    error.__cause__ = ValueError("not carried")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is cls
    assert copy.code == error.code
    assert copy.message == error.message
    assert str(copy) == str(error)
    assert copy.details == error.details
    assert copy.__dict__ == error.__dict__


def test_flow_not_found_keeps_its_message_once() -> None:
    copy = pickle.loads(pickle.dumps(FlowNotFoundError("signup")))
    assert str(copy) == "Flow 'signup' not found"


def test_invalid_transition_error_is_constructible_as_the_seed_does() -> None:
    error = InvalidTransitionError("welcome", "jump")
    assert (error.from_step, error.transition) == ("welcome", "jump")
    assert error.details == {"from_step": "welcome", "transition": "jump"}


def _raise_in_worker(name: str) -> None:
    raise _example(getattr(flowstore.errors, name))


def test_an_error_raised_in_a_process_pool_worker_arrives_whole() -> None:
    with ProcessPoolExecutor(max_workers=1) as pool:
        for name in ("InvalidTransitionError", "FlowStateNotFoundError", "PayloadTooLargeError"):
            with pytest.raises(getattr(flowstore.errors, name)) as caught:
                pool.submit(_raise_in_worker, name).result()
            assert caught.value.details == _example(getattr(flowstore.errors, name)).details
        assert pool.submit(int, "7").result() == 7  # the pool survived
