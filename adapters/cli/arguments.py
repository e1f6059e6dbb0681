"""The command line's argument types and shared options (standard library only)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from flowstore.adapters.logs import LOG_FORMATS, LOG_LEVELS

__all__ = [
    "PROJECTOR_ENV",
    "PROJECTOR_MODES",
    "handler_spec",
    "json_file",
    "json_object",
    "logging_options",
    "moment",
    "positive",
    "seconds",
    "step_pair",
]

_JSON_KINDS = {
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
}


def json_object(text: str) -> dict[str, Any]:
    import orjson

    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc})") from None
    return _mapping(value, "a JSON object")


def json_file(path: str) -> dict[str, Any]:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {exc.strerror}") from None
    if path.endswith((".yaml", ".yml")):
        return _yaml_object(text)
    return json_object(text)


def _yaml_object(text: str) -> dict[str, Any]:
    try:
        import yaml
    except ImportError:
        hint = "YAML needs the providers extra: pip install 'flowstore-es[providers]'"
        raise argparse.ArgumentTypeError(hint) from None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise argparse.ArgumentTypeError(f"not valid YAML ({' '.join(str(exc).split())})") from None
    return _mapping(value, "a YAML mapping")


def _mapping(value: Any, what: str) -> dict[str, Any]:
    """`value` if it is an object (JSON) or mapping (YAML); a usage error naming its kind otherwise."""
    if not isinstance(value, dict):
        kind = _JSON_KINDS.get(type(value), "null")
        raise argparse.ArgumentTypeError(f"must be {what}, not {kind}")
    return value


def step_pair(text: str) -> tuple[str, str]:
    old, equals, new = text.partition("=")
    if not equals or not old or not new:
        raise argparse.ArgumentTypeError(f"must be OLD=NEW (two step names), not {text!r}")
    return old, new


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds, not {text!r}")
    return value


def moment(text: str) -> Any:
    from datetime import UTC, datetime

    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an ISO 8601 time, not {text!r}") from None
    # A command line has no other zone to mean: a time without one is UTC, like everything stored.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return value


PROJECTOR_ENV = "FLOWSTORE_PROJECTOR"
"""`live` (the default) or `off`: whether `flowstore serve` keeps the tables current itself."""
PROJECTOR_MODES = ("live", "off")


def logging_options(sub: argparse.ArgumentParser) -> None:
    """--log-level and --log-format, for the commands that run until stopped."""
    sub.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="default: info")
    sub.add_argument("--log-format", choices=LOG_FORMATS, default="text", help="default: text")


def handler_spec(text: str) -> str:
    module_name, colon, attribute = text.partition(":")
    names = [*module_name.split("."), attribute]
    if not colon or not all(name.isidentifier() for name in names):
        raise argparse.ArgumentTypeError(f"must be module:function, not {text!r}")
    return text
