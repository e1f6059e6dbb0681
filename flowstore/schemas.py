"""Payload JSON Schemas, checked and evaluated without touching the network, the disk or the GIL for long.

A `payloadSchema` comes from whoever may define flows; its payloads come from every user. Three
things in stock jsonschema would let either side hurt the server, and each is closed here:

- `$ref` resolution: stock jsonschema follows remote and `file://` references (SSRF, local files
  echoed back in answers). Here a schema may only refer into itself (`#...`): other references are
  refused when the definition is saved, and the registry behind validation retrieves nothing.
- `pattern` / `patternProperties`: Python's `re` backtracks (`^(\\w+\\s?)*$` on 28 characters held
  the GIL for 12 s). They run on RE2 (linear time); patterns RE2 cannot compile (back references,
  lookaround) are refused when the definition is saved.
- `uniqueItems`: stock jsonschema compares pairs (3,000 objects took 47 s of CPU); here one pass
  over canonical encodings.

Every validation also has a budget of keyword evaluations (`MAX_VALIDATION_STEPS`) and of CPU time
(`MAX_VALIDATION_CPU_SECONDS`): schemas whose applicators multiply (`anyOf` of recursive `$ref`s)
end in a `PayloadValidationError`, not a freeze.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from functools import lru_cache
from typing import Any

import jsonschema
import orjson
import re2  # type: ignore[import-untyped]
import referencing
import referencing.exceptions
from jsonschema.exceptions import ValidationError

__all__ = [
    "MAX_VALIDATION_CPU_SECONDS",
    "MAX_VALIDATION_STEPS",
    "PayloadSchema",
    "schema_problems",
]

MAX_VALIDATION_STEPS = 100_000
"""Most keyword evaluations one payload may cost (a 64 KiB payload against a plain schema needs a
few thousand; 32,000 integers checked for type and range about 96,000); past it the payload is
refused, so validation time stays bounded whatever the schema."""

MAX_VALIDATION_CPU_SECONDS = 1.0
"""Most CPU time (of the validating thread) one payload may cost, whatever the steps cost each:
100,000 steps through `$ref`s measured 1.2 s, 96,000 plain ones 0.6 s."""

_REF_KEYWORDS = ("$ref", "$dynamicRef", "$recursiveRef")

# Keywords whose values are data, not subschemas: a "pattern" key inside them is no regex.
_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples", "properties", "$defs"})


class _BudgetExceededError(Exception):
    """A payload's validation needed more than `MAX_VALIDATION_STEPS` keyword evaluations."""


def _re2_options() -> Any:
    options = re2.Options()
    # RE2 logs every pattern it refuses to stderr; refusals are reported as DefinitionError instead.
    options.log_errors = False
    return options


_OPTIONS = _re2_options()


@lru_cache(maxsize=1024)
def _compiled(pattern: str) -> Any:
    return re2.compile(pattern, _OPTIONS)


def _regex_problem(pattern: str) -> str | None:
    try:
        _compiled(pattern)
    except re2.error as exc:
        reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else exc
        return f"pattern {pattern!r} is not supported ({reason}); back references and lookaround are refused"
    return None


def _walk(schema: Any, where: str) -> Iterator[tuple[str, str, Any]]:
    """(location, keyword, value) of every keyword in a schema and its subschemas."""
    if isinstance(schema, list):
        for i, item in enumerate(schema):
            yield from _walk(item, f"{where}/{i}")
        return
    if not isinstance(schema, Mapping):
        return
    for key, value in schema.items():
        yield where, str(key), value
        if key in ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas"):
            if isinstance(value, Mapping):
                for name, sub in value.items():
                    yield from _walk(sub, f"{where}/{key}/{name}")
        elif key not in _DATA_KEYWORDS:
            yield from _walk(value, f"{where}/{key}")


def schema_problems(schema: dict[str, Any]) -> list[str]:
    """Every reason this payload schema cannot be used safely (empty when it can)."""
    cls = jsonschema.validators.validator_for(schema)
    try:
        cls.check_schema(schema)
    except jsonschema.exceptions.SchemaError as exc:
        return [f"not a valid JSON Schema: {exc.message}"]
    problems: list[str] = []
    patterned = False
    unevaluated = False
    for where, keyword, value in _walk(schema, "#"):
        if keyword in _REF_KEYWORDS and isinstance(value, str) and not value.startswith("#"):
            problems.append(
                f"{keyword} {value!r} at {where} refers outside the schema; only local "
                "references (#...) are allowed"
            )
        elif keyword == "pattern" and isinstance(value, str):
            problem = _regex_problem(value)
            if problem:
                problems.append(f"{problem} (at {where})")
        elif keyword == "patternProperties" and isinstance(value, Mapping):
            patterned = True
            for pattern in value:
                problem = _regex_problem(str(pattern))
                if problem:
                    problems.append(f"{problem} (at {where}/patternProperties)")
        elif keyword == "unevaluatedProperties":
            unevaluated = True
    if patterned and unevaluated:
        # jsonschema matches patternProperties with Python's re while collecting evaluated keys.
        problems.append("unevaluatedProperties cannot be combined with patternProperties")
    return problems


def _canonical(value: Any) -> Any:
    """A value whose orjson encoding is equal exactly when JSON Schema calls two values equal."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)  # 1.0 == 1 in JSON Schema
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


def _unique(items: list[Any]) -> bool:
    seen: set[bytes] = set()
    for item in items:
        key = orjson.dumps(_canonical(item), option=orjson.OPT_SORT_KEYS)
        if key in seen:
            return False
        seen.add(key)
    return True


def _unique_items(validator: Any, ui: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if ui and validator.is_type(instance, "array") and not _unique(instance):
        yield ValidationError(f"{_short(instance)} has non-unique elements")


def _pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not _compiled(pattern).search(instance):
        yield ValidationError(f"{_short(instance)} does not match {pattern!r}")


def _pattern_properties(
    validator: Any, patterns: Mapping[str, Any], instance: Any, schema: Any
) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for key, value in instance.items():
            if _compiled(pattern).search(key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional(instance: Mapping[str, Any], schema: Mapping[str, Any]) -> list[str]:
    properties = schema.get("properties", {})
    patterns = [_compiled(p) for p in schema.get("patternProperties", {})]
    return [
        key
        for key in instance
        if key not in properties and not any(p.search(key) for p in patterns)
    ]


def _additional_properties(
    validator: Any, ap: Any, instance: Any, schema: Any
) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    extras = _additional(instance, schema)
    if validator.is_type(ap, "object"):
        for extra in extras:
            yield from validator.descend(instance[extra], ap, path=extra)
    elif not ap and extras:
        shown = ", ".join(repr(each) for each in sorted(extras))
        yield ValidationError(f"Additional properties are not allowed ({shown} unexpected)")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


_budget = threading.local()


def _counted(keyword: Callable[..., Any]) -> Callable[..., Any]:
    def evaluate(validator: Any, value: Any, instance: Any, schema: Any) -> Any:
        left = getattr(_budget, "left", None)
        if left is not None:
            if left <= 0:
                raise _BudgetExceededError
            _budget.left = left - 1
            if left % 256 == 0 and time.thread_time() > _budget.cpu_deadline:
                raise _BudgetExceededError
        return keyword(validator, value, instance, schema)

    return evaluate


_SAFE_KEYWORDS: dict[str, Callable[..., Any]] = {
    "pattern": _pattern,
    "patternProperties": _pattern_properties,
    "additionalProperties": _additional_properties,
    "uniqueItems": _unique_items,
}


@lru_cache(maxsize=16)
def _safe_class(base: Any) -> Any:
    keywords = dict(base.VALIDATORS)
    for name in _SAFE_KEYWORDS:
        if name in keywords:
            keywords[name] = _SAFE_KEYWORDS[name]
    return jsonschema.validators.extend(  # type: ignore[no-untyped-call]
        base, {name: _counted(fn) for name, fn in keywords.items()}
    )


def _refuse(uri: str) -> referencing.Resource[Any]:
    # Never fetch: validation must not reach the network or the file system.
    raise referencing.exceptions.NoSuchResource(ref=uri)  # type: ignore[call-arg]


class PayloadSchema:
    """A compiled payload schema: validates payloads with no retrieval, RE2 regexes and a budget."""

    def __init__(self, schema: dict[str, Any]) -> None:
        cls = _safe_class(jsonschema.validators.validator_for(schema))
        self._validator = cls(schema, registry=referencing.Registry(retrieve=_refuse))  # type: ignore[call-arg]

    def problem(self, payload: Any) -> str | None:
        """The first reason the payload fails the schema, or None."""
        _budget.left = MAX_VALIDATION_STEPS
        _budget.cpu_deadline = time.thread_time() + MAX_VALIDATION_CPU_SECONDS
        try:
            error = jsonschema.exceptions.best_match(self._validator.iter_errors(payload))
        except _BudgetExceededError:
            return (
                f"payload needs more than {MAX_VALIDATION_STEPS} schema checks or "
                f"{MAX_VALIDATION_CPU_SECONDS:g} s of CPU to validate"
            )
        except referencing.exceptions.Unresolvable as exc:
            return f"payloadSchema reference cannot be resolved: {_short(str(exc))}"
        except RecursionError:
            return "payloadSchema refers to itself without end"
        except re2.error:
            # A definition stored before patterns were checked: refused per payload, not a 500.
            return "payloadSchema has a pattern RE2 cannot run (back reference or lookaround)"
        finally:
            _budget.left = None
        if error is None:
            return None
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        return f"payload at {where}: {error.message}"
