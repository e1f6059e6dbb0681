"""Run the reliability tests and write RELIABILITY.md: what was tried, what held, what was lost.

    python -m tests.reliability.report            # long variants (FLOWSTORE_LONG=1), a few minutes
    python -m tests.reliability.report --quick    # the CI variants
    python -m tests.reliability.report --output somewhere.md -- -k faults   # pytest args after --

Each test appends its figures (fault, count, duration, load, what held, what was lost) to a JSON-lines
file named by $FLOWSTORE_RELIABILITY_OUT; pytest's JUnit XML gives each test's outcome. Tests marked
xfail(strict=True) are known bugs: they are listed with their reasons. Exits non-zero if a test failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.reliability.harness import OUT_ENV, REPO

BAD_INPUT_TEST = "test_bad_input_gets_its_typed_error_and_changes_nothing"


ERASURE_SECTION = [
    "## Erasure: what remains where, and for how long",
    "",
    "Asserted by `tests/e2e/test_erasure_on_disk.py` (a live `flowstore serve`, an erasure over HTTP, "
    "then every file of the store searched byte by byte; on PostgreSQL the key table's heap file "
    "after a CHECKPOINT) and measured with 2,000 and 20,000 other users in the store (`erase_user` "
    "took 40 / 126 ms on SQLite, WAL truncation included, and 100 / 417 ms on PostgreSQL, the key "
    "table's VACUUM FULL included; `python -m benchmarks.erasure_residue N` measures it again):",
    "",
    "| where | after `erase_user` returns | for how long |",
    "|---|---|---|",
    "| the log | the user's events, sealed under a key that no longer exists (flow, steps, times "
    "readable) | for good (append-only) |",
    "| SQLite database file, `-wal`, `-shm` | no byte of the user id, the payloads or the raw key "
    "(`secure_delete` on every connection; WAL checkpointed and truncated to 0 bytes) | - |",
    "| PostgreSQL key table | no byte of the key (`VACUUM FULL` rewrites the small table) | - |",
    "| PostgreSQL `flow_states` / `flow_history` heap | the deleted rows' bytes (user id, payload): "
    "2 and 8-11 copies of the user id measured after the erasure, still 1-2 and 8-11 after a "
    "plain VACUUM | "
    "until "
    "the space is reused, or `VACUUM FULL` of those tables |",
    "| PostgreSQL WAL | every row as written, key included (18-24 copies of the user id in `pg_wal`) "
    "| until the segments are recycled (checkpoints, `max_wal_size`) or the WAL archive expires |",
    "| backups, replicas, Kafka topics | what they held before | their own retention |",
]
"""RELIABILITY.md's erasure section (its figures come from tests/e2e/test_erasure_on_disk.py and the
measurement in the sec branch's note; rerun them when erasure changes)."""


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _outcomes(junit: Path) -> dict[str, tuple[str, str]]:
    """Test node id -> (outcome, message) from pytest's JUnit XML."""
    outcomes: dict[str, tuple[str, str]] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        module = case.get("classname", "").replace(".", "/")
        node = f"{module}.py::{case.get('name')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag == "skipped":
                kind = child.get("type", "")
                outcome = "xfailed" if "xfail" in kind else "skipped"
                message = child.get("message", "")
            elif child.tag in ("failure", "error"):
                outcome, message = "FAILED", (child.get("message") or "")[:300]
        outcomes[node] = (outcome, message.removeprefix("reason: "))
    return outcomes


def _environment() -> str:
    try:
        postgres = subprocess.run(
            ["pg_config", "--version"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        postgres = "?"
    return (
        f"{platform.system()} {platform.release()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, {postgres or 'PostgreSQL ?'}"
    )


def render(
    rows: list[dict[str, Any]],
    outcomes: dict[str, tuple[str, str]],
    *,
    command: str,
    long: bool,
    seconds: float,
) -> str:
    """RELIABILITY.md from the figures and the outcomes."""
    lines = [
        "# Reliability",
        "",
        f"Produced by `{command}` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC "
        f"({'long variants, FLOWSTORE_LONG=1' if long else 'quick CI variants'}; "
        f"{seconds / 60:.1f} min; {_environment()}). Rerun that command to refresh this file; "
        "the tests are in `tests/reliability/`.",
        "",
        '"Lost" counts accepted (or rejected-and-recorded) transitions missing from the log, or '
        'events missing from the Kafka topic: it must be 0. "Held" is what the test asserted '
        "afterwards. Faults are injected at random moments (random delays before each kill, "
        "random downtime).",
        "",
        "## Faults, load and the model",
        "",
        "| fault | backend | count | duration (s) | load | held | lost | outcome | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        outcome, message = outcomes.get(row["test"], ("?", ""))
        if outcome == "xfailed":
            outcome = f"xfailed: {message[:160]}"
        lines.append(
            "| "
            + " | ".join(
                _cell(row[k])
                for k in ("fault", "backend", "count", "seconds", "load", "held", "lost")
            )
            + f" | {_cell(outcome)} | {_cell(row['notes'])} |"
        )
    measured = {row["test"] for row in rows}
    unmeasured = [
        (node, outcome)
        for node, outcome in outcomes.items()
        if node not in measured and "test_bad_input" not in node
    ]
    bad_input = {n: o for n, o in outcomes.items() if "test_bad_input" in n}
    tally = Counter(outcome for outcome, _ in bad_input.values())
    lines += [
        "",
        "## Bad input",
        "",
        f"`tests/reliability/test_bad_input.py`: {len(bad_input)} rows (one test each; a row per "
        "backend where storage matters): "
        + ", ".join(f"{n} {kind}" for kind, n in sorted(tally.items()))
        + ". A passing row got its typed FlowError (or, for hostile but valid input, was stored "
        "verbatim) and left the log, the states, the flows and every table row unchanged, and the "
        "store still worked afterwards.",
    ]
    lines += ["", *ERASURE_SECTION]
    known: dict[str, list[str]] = defaultdict(list)
    for node, (outcome, message) in outcomes.items():
        if outcome == "xfailed":
            name = node.split("::", 1)[1]
            if name.startswith(BAD_INPUT_TEST):  # the row id says it all
                name = "bad input " + name.removeprefix(BAD_INPUT_TEST).strip("[]")
            known[message].append(name)
    if known:
        lines += [
            "",
            "## Known bugs (tests marked xfail: they fail today and say what should happen; strict unless the failure is intermittent)",
            "",
            "| bug | tests |",
            "|---|---|",
        ]
        # Bugs first (then findings and risks), the most widespread first.
        order = sorted(
            known.items(), key=lambda item: (not item[0].startswith("bug"), -len(item[1]))
        )
        for message, nodes in order:
            shown = ", ".join(f"`{n}`" for n in nodes[:6]) + (
                f" and {len(nodes) - 6} more" if len(nodes) > 6 else ""
            )
            lines.append(f"| {_cell(message)} | {shown} |")
    failed = [(n, o) for n, o in outcomes.items() if o[0] == "FAILED"]
    if failed:
        lines += ["", "## Failed", ""]
        lines += [f"- `{n}`: {_cell(m)}" for n, (_, m) in failed]
    other = [n for n, (o, _) in unmeasured if o not in ("passed", "xfailed", "FAILED")]
    if other:
        lines += ["", "Skipped: " + ", ".join(f"`{n}`" for n in other)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the CI variants, not the long ones")
    parser.add_argument("--output", default=str(REPO / "RELIABILITY.md"))
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="flowstore-reliability-") as tmp:
        figures, junit = Path(tmp) / "figures.jsonl", Path(tmp) / "junit.xml"
        env = {
            **os.environ,
            OUT_ENV: str(figures),
            "FLOWSTORE_LONG": "0" if args.quick else "1",
        }
        command = [
            *(sys.executable, "-m", "pytest", "tests/reliability", "-q", "-p", "no:cacheprovider"),
            *(f"--junitxml={junit}", "-o", "junit_family=xunit1", "-o", "timeout=3600"),
            *args.pytest_args,
        ]
        began = time.monotonic()
        done = subprocess.run(command, cwd=REPO, env=env, check=False)
        seconds = time.monotonic() - began
        rows = (
            [json.loads(line) for line in figures.read_text().splitlines()]
            if figures.exists()
            else []
        )
        outcomes = _outcomes(junit) if junit.exists() else {}
    shown = "python -m tests.reliability.report" + (" --quick" if args.quick else "")
    text = render(rows, outcomes, command=shown, long=not args.quick, seconds=seconds)
    Path(args.output).write_text(text)
    print(f"wrote {args.output}: {len(rows)} figures, {len(outcomes)} tests")
    return done.returncode


if __name__ == "__main__":
    raise SystemExit(main())
