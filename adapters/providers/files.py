"""The `file` source, and reading definition documents (YAML or JSON, also for the remote source).

A document is one definition in the seed's JSON shape, a list of them, or `{"flows": [...]}`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson
import yaml

from flowstore import DefinitionError, FlowDefinition
from flowstore.adapters.providers.base import SourceUnavailableError
from flowstore.definitions import parse_definition

DEFINITION_SUFFIXES = (".json", ".yaml", ".yml")
"""The files a folder source reads (others are ignored)."""


def definitions_in(data: Any, origin: str) -> tuple[list[FlowDefinition], list[str]]:
    """The valid definitions in one parsed document, and the problems of the others.

    A document is one definition, a list of them, or {"flows": [...] or {id: definition}}.
    """
    if isinstance(data, Mapping) and "flows" in data and "flow" not in data:
        data = data["flows"]
        if isinstance(data, Mapping):
            data = list(data.values())
    items = data if isinstance(data, list) else [data]
    definitions: list[FlowDefinition] = []
    problems: list[str] = []
    for i, item in enumerate(items):
        try:
            definitions.append(parse_definition(item))
        except DefinitionError as exc:
            where = f"{origin}" + (f" item {i}" if isinstance(data, list) else "")
            name = f" flow {exc.flow_id!r}" if exc.flow_id else ""
            problems.extend(f"{where}{name}: {p}" for p in exc.problems)
    return definitions, problems


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases: a few hundred bytes of nested aliases expand to gigabytes."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed in flow definitions", event.start_mark
            )
        return super().compose_node(parent, index)


def load_yaml(text: str) -> Any:
    """YAML without aliases (see `_NoAliasLoader`)."""
    return yaml.load(text, Loader=_NoAliasLoader)  # a SafeLoader subclass


def _read_file(path: Path) -> tuple[list[FlowDefinition], list[str]]:
    text = path.read_text(encoding="utf-8")
    try:
        data = load_yaml(text) if path.suffix in (".yaml", ".yml") else orjson.loads(text)
    except (orjson.JSONDecodeError, yaml.YAMLError) as exc:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        return [], [f"{path}: not valid {kind}: {' '.join(str(exc).split())}"]
    return definitions_in(data, str(path))


def read_definitions(path: str | Path) -> list[FlowDefinition]:
    """Every definition in a YAML/JSON file, or in the folder's .json/.yaml/.yml files (by name).

    Raises `DefinitionError` listing every problem in every file (a flow defined twice is one),
    and `OSError` when the path cannot be read.
    """
    path = Path(path)
    files = (
        sorted(p for p in path.iterdir() if p.suffix in DEFINITION_SUFFIXES and p.is_file())
        if path.is_dir()
        else [path]
    )
    definitions: list[FlowDefinition] = []
    seen: dict[str, Path] = {}
    problems: list[str] = []
    for file in files:
        found, file_problems = _read_file(file)
        problems.extend(file_problems)
        for definition in found:
            if definition.flow in seen:
                problems.append(
                    f"flow {definition.flow!r} is defined in both {seen[definition.flow]} and {file}"
                )
                continue
            seen[definition.flow] = file
            definitions.append(definition)
    if problems:
        raise DefinitionError(None, problems)
    return definitions


class FileFetcher:
    """Reads a YAML/JSON file or a folder of them, whole, on every fetch."""

    whole = True
    can_list = True

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = f"file:{path}"

    def fetch(self, flow_id: str | None) -> dict[str, FlowDefinition]:
        """Every flow in the file(s); an unreadable or invalid file is unavailable."""
        try:
            return {d.flow: d for d in read_definitions(self.path)}
        except OSError as exc:
            raise SourceUnavailableError(exc.strerror or str(exc)) from None
        except DefinitionError as exc:
            raise SourceUnavailableError("; ".join(exc.problems)) from None

    def close(self) -> None:
        """Nothing to release."""
