"""How the command line shows results: rich tables for people, JSON with `--json`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

from flowstore.errors import FlowError

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

    from flowstore import FlowStore
    from flowstore.adapters.render import Model

__all__ = ["Handler", "Listing", "Note", "Output", "Result"]


@dataclass(frozen=True)
class Listing:
    """Models of one kind: a table with a row each for people, a JSON array for machines."""

    items: Sequence[Model]
    fields: tuple[str, ...]
    """The models' (snake_case) fields to show as columns."""
    title: str


@dataclass(frozen=True)
class Note:
    """The answer of a command that returns no model: a sentence for people, an object for JSON."""

    text: str
    data: dict[str, Any]
    exit_code: int = 0


Result: TypeAlias = "Model | Listing | Note | None"

_PIPE_WIDTH = 120


class Output:
    """The one place results are printed: as rich tables, or as JSON with `--json`."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        # With --json, stdout is for JSON only: anything for people (the demo) goes to stderr.
        # Piped output (logs, CI) gets 120 columns rather than rich's 80 unless $COLUMNS says.
        self._console: Console | None = None

    @property
    def console(self) -> Console:
        """The rich console for people (stderr under `--json`), made on first use."""
        if self._console is None:
            try:
                from rich.console import Console
            except ImportError as missing:  # the library installs without the command's extras
                raise SystemExit(
                    f"flowstore: the command line needs the cli extra ({missing.name} is "
                    "missing): pip install 'flowstore-es[cli]'"
                ) from None

            stream = sys.stderr if self.as_json else sys.stdout
            width = None if stream.isatty() or "COLUMNS" in os.environ else _PIPE_WIDTH
            self._console = Console(stderr=self.as_json, width=width)
        return self._console

    def show(self, result: Result) -> None:
        """Print a command's result (nothing for None)."""
        if result is None:
            return
        if self.as_json:
            import orjson

            sys.stdout.write(orjson.dumps(self._data(result)).decode() + "\n")
        else:
            console = self.console  # first: it says which extra is missing, if one is
            console.print(self._view(result))

    def error(self, err: FlowError) -> None:
        """Report a flowstore error: a JSON object on stdout with `--json`, else a line on stderr."""
        if self.as_json:
            import orjson

            # default=str: details may hold values without a JSON form (a path, a datetime).
            data = orjson.dumps(err.to_dict(), default=str)
            sys.stdout.write(data.decode() + "\n")
        else:
            print(f"error[{err.code}]: {' '.join(err.message.split())}", file=sys.stderr)

    @staticmethod
    def _data(result: Model | Listing | Note) -> Any:
        from flowstore.adapters.render import record

        if isinstance(result, Listing):
            return [record(item) for item in result.items]
        if isinstance(result, Note):
            return result.data
        return record(result)

    @staticmethod
    def _view(result: Model | Listing | Note) -> RenderableType:
        from rich.markup import escape

        from flowstore.adapters.render import model_view, table

        if isinstance(result, Listing):
            return table(result.items, result.fields, title=result.title)
        if isinstance(result, Note):
            return escape(result.text)  # row keys in brackets are data, not rich markup
        return model_view(result)


Handler: TypeAlias = "Callable[[FlowStore, argparse.Namespace, Output], Result]"
"""A command: one function each, (store, args, output) -> what to show."""
