"""Flow diagrams as files: the library's Mermaid/DOT text, and SVG/PNG rendered by Graphviz.

The text comes from `FlowStore.diagram` (`flowstore.diagrams`, pure); SVG and PNG are that DOT text
run through Graphviz's `dot` command, which must be installed (Debian: `apt-get install graphviz`).
"""

from __future__ import annotations

import shutil
import subprocess
from typing import Literal, get_args

from flowstore import FlowStore, InvalidArgumentError

__all__ = ["OUTPUT_FORMATS", "OutputFormat", "diagram_bytes", "graphviz_available", "render_dot"]

OutputFormat = Literal["mermaid", "dot", "svg", "png"]
OUTPUT_FORMATS: tuple[OutputFormat, ...] = get_args(OutputFormat)
"""Every format a diagram can be written in."""

_RENDER_TIMEOUT = 60.0


def graphviz_available() -> bool:
    """True when Graphviz's `dot` command is on the PATH (needed for SVG and PNG)."""
    return shutil.which("dot") is not None


def render_dot(dot_text: str, fmt: Literal["svg", "png"]) -> bytes:
    """DOT text rendered by Graphviz; `InvalidArgumentError` if `dot` is not installed."""
    executable = shutil.which("dot")
    if executable is None:
        raise InvalidArgumentError(
            "format",
            fmt,
            "rendering needs Graphviz's `dot` command (Debian: apt-get install graphviz); "
            "the mermaid and dot formats need nothing",
        )
    result = subprocess.run(
        [executable, f"-T{fmt}"],
        input=dot_text.encode(),
        capture_output=True,
        timeout=_RENDER_TIMEOUT,
        check=False,
    )
    if result.returncode != 0:
        # The DOT text is ours, so a failure here is a bug in flowstore.diagrams, not bad input.
        msg = f"Graphviz dot failed ({result.returncode}): {result.stderr.decode(errors='replace')}"
        raise RuntimeError(msg)
    return result.stdout


def diagram_bytes(
    store: FlowStore,
    flow_id: str,
    fmt: OutputFormat = "mermaid",
    *,
    stats: bool = False,
    version: int | None = None,
) -> bytes:
    """The flow's diagram in any output format, as the bytes of a file."""
    if fmt == "svg" or fmt == "png":
        return render_dot(store.diagram(flow_id, "dot", stats=stats, version=version), fmt)
    return store.diagram(flow_id, fmt, stats=stats, version=version).encode()
