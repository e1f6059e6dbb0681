"""Bad input, one test per row: each gets its typed FlowError and leaves the store unchanged.

"Unchanged" is checked, not assumed: the log position, every seeded user's state, the flows listed
and every row of the projection tables are the same before and after; rejected transitions (a
transition the step does not offer, a payload its schema refuses) are facts and add exactly one
`TransitionRejected`, nothing else. Afterwards the store must still work: another user's command
reaches the tables (a poisoned projection would stall here) and `verify_projections() == []`.

Rows marked xfail(strict=True) are bugs found by this table (see their reasons); the test says what
should happen, so it starts passing (and the mark must go) when the core is fixed.

Hostile input that is valid (SQL-looking strings, quotes, NUL inside a JSON payload) must be stored
verbatim instead: `test_hostile_but_valid_input_is_stored_verbatim`.
"""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from flowstore import (
    DefinitionError,
    FlowError,
    FlowExistsError,
    FlowNotFoundError,
    FlowStateCorruptionError,
    FlowStateNotFoundError,
    FlowStore,
    InvalidArgumentError,
    InvalidStepError,
    InvalidTransitionError,
    PayloadTooLargeError,
    PayloadValidationError,
)
from flowstore.domain import TransitionRejected, instance_id
from flowstore.projections.sql import SqlProjections
from flowstore.storage import parse_url
from tests.flows import linear
from tests.reliability.harness import LONG, REPO
from tests.reliability.ledger import all_events

SCHEMA_FLOW = {
    "flow": "schema",
    "initialStep": "a",
    "steps": {
        "a": {
            "index": 0,
            "step": "a",
            "service": "s",
            "transitions": {
                "submit": {
                    "transition": "submit",
                    "step": "b",
                    "payloadSchema": {
                        "type": "object",
                        "required": ["email"],
                        "properties": {
                            "email": {"type": "string", "format": "email"},
                            # Backtracks catastrophically in Python's re; RE2 runs it linearly.
                            "name": {"type": "string", "pattern": r"^(\w+\s?)*$"},
                            "tags": {"type": "array", "uniqueItems": True},
                        },
                    },
                }
            },
        },
        "b": {"index": 1, "step": "b", "service": "s", "transitions": {}},
    },
}
SEEDED = [("ann", "f"), ("bob", "f"), ("ann", "schema")]
SYNC_TIMEOUT = 5.0  # a healthy store projects in milliseconds; a poisoned one never does


def deep(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(levels):
        value = {"a": value}
    return value


def one_step(flow: str, **step: Any) -> dict[str, Any]:
    """A flow whose only step is terminal, with the step's fields overridden."""
    first = {"index": 0, "step": "a", "service": "s", "transitions": {}, **step}
    return {"flow": flow, "initialStep": first["step"], "steps": {first["step"]: first}}


def schema_flow(flow: str, schema: dict[str, Any]) -> dict[str, Any]:
    """two_steps(flow) whose transition has `schema` as its payload schema."""
    definition = two_steps(flow)
    definition["steps"]["a"]["transitions"]["go"]["payloadSchema"] = schema
    return definition


def two_steps(flow: str, *, target: str = "b", name: str = "go", **second: Any) -> dict[str, Any]:
    """a --name--> target; the step `b` (renamed by `second`) is terminal."""
    b = {"index": 1, "step": "b", "service": "s", "transitions": {}, **second}
    return {
        "flow": flow,
        "initialStep": "a",
        "steps": {
            "a": {
                "index": 0,
                "step": "a",
                "service": "s",
                "transitions": {name: {"transition": name, "step": target}},
            },
            b["step"]: b,
        },
    }


LONG_NAME = "n" * 300


@dataclass(frozen=True)
class Case:
    """One row: the call, the error it must raise, and what else is known about it."""

    id: str
    action: Callable[[FlowStore], Any]
    error: type[FlowError]
    recorded: bool = False
    """A rejected transition: recorded as one TransitionRejected (and raised)."""
    bug: str | None = None
    """Why it currently fails (xfail, strict)."""
    bug_on: tuple[str, ...] = ("sqlite", "postgres")
    storage: bool = False
    """Depends on the backend: run on PostgreSQL too (every row does under FLOWSTORE_LONG=1)."""
    corrupt: str | None = None
    """Write an undecodable event into ann's instance first: "bytes", "fields" or "topic"."""
    opens: bool = False
    """The call is opening another store (live projections) on the same database."""
    match: str | None = None
    """A regular expression the error message must match (so it is refused for the right reason)."""


NUL_PG = (
    "PostgreSQL text columns cannot hold NUL: the event is appended, then its projection fails on "
    "every catch-up (psycopg.DataError), so no later event of any user reaches the tables and "
    "table queries raise ProjectionLagError (a TimeoutError) after 60 s"
)

# fmt: off
CASES = [
    # Unknown flow, user, transition, step, version
    Case("unknown-flow-transition", lambda s: s.execute_transition("ann", "nope", "next"), FlowNotFoundError),
    Case("unknown-flow-reset", lambda s: s.reset_flow("ann", "nope"), FlowNotFoundError),
    Case("unknown-flow-history", lambda s: s.get_flow_history("ann", "nope"), FlowNotFoundError),
    Case("unknown-flow-statistics", lambda s: s.get_flow_statistics("nope"), FlowNotFoundError),
    Case("unknown-flow-funnel", lambda s: s.get_flow_funnel("nope"), FlowNotFoundError),
    Case("unknown-flow-update", lambda s: s.update_flow("nope", {"ttl": 5}), FlowNotFoundError),
    Case("unknown-flow-delete", lambda s: s.delete_flow("nope"), FlowNotFoundError),
    Case("unknown-flow-migrate", lambda s: s.migrate_flows("nope", 1), FlowNotFoundError),
    Case("unknown-flow-override", lambda s: s.set_flow_state("ann", {"flow": "nope", "step": "s0"}), FlowNotFoundError),
    Case("unknown-version", lambda s: s.get_flow("f", 99), FlowNotFoundError),
    Case("unknown-user-clear", lambda s: s.clear_flow_state("nobody", "f"), FlowStateNotFoundError),
    Case("unknown-transition", lambda s: s.execute_transition("ann", "f", "warp"), InvalidTransitionError, recorded=True, match='warp'),
    Case("unknown-step-reset", lambda s: s.reset_flow("ann", "f", "nowhere"), InvalidStepError, match='nowhere'),
    Case("unknown-step-override", lambda s: s.set_flow_state("ann", {"flow": "f", "step": "nowhere"}), InvalidStepError, match='nowhere'),
    Case("unknown-step-migrate-map", lambda s: s.migrate_flows("f", 1, {"s0": "nowhere"}), InvalidStepError, match='nowhere'),
    # Malformed definitions
    Case("definition-not-an-object", lambda s: s.create_flow(["a"]), DefinitionError),  # type: ignore[arg-type]
    Case("definition-dangling-target", lambda s: s.create_flow(two_steps("g", target="ghost")), DefinitionError, match="unknown step 'ghost'"),
    Case("definition-missing-initial-step", lambda s: s.create_flow({**linear("g"), "initialStep": "zz"}), DefinitionError, match="initialStep 'zz' is not a step"),
    # Unreachable steps and loops without a terminal step are warnings (validate_flow), not errors.
    Case("definition-shape-and-meaning-together", lambda s: s.create_flow({**two_steps("g", target="ghost"), "ttl": -5} | {"steps": {**two_steps("g", target="ghost")["steps"], "b": {"index": "x", "step": "b", "service": "s"}}}), DefinitionError, match="(?s)index.*ghost.*ttl must be a positive"),
    Case("definition-wrong-types", lambda s: s.create_flow({"flow": "g", "initialStep": 3, "steps": "many"}), DefinitionError, match='initialStep'),
    Case("definition-unknown-key", lambda s: s.create_flow({**linear("g"), "colour": "red"}), DefinitionError, match='colour'),
    Case("definition-remote-ref", lambda s: s.create_flow(schema_flow("g", {"properties": {"a": {"$ref": "http://127.0.0.1:1/x.json"}}})), DefinitionError, match="refers outside the schema"),
    Case("definition-file-ref", lambda s: s.create_flow(schema_flow("g", {"$ref": "file:///etc/hostname"})), DefinitionError, match="refers outside the schema"),
    Case("definition-backreference-pattern", lambda s: s.create_flow(schema_flow("g", {"properties": {"a": {"type": "string", "pattern": r"^(a+)\1$"}}})), DefinitionError, match="is not supported"),
    Case("definition-lookahead-pattern-property", lambda s: s.create_flow(schema_flow("g", {"patternProperties": {"(?=x)": {}}})), DefinitionError, match="is not supported"),
    Case("definition-flow-id-dot-dot", lambda s: s.create_flow(two_steps("..")), DefinitionError, match="must not be"),
    Case("definition-flow-id-slash", lambda s: s.create_flow(two_steps("tenant/flow")), DefinitionError, match="must not be"),
    Case("quarantine-a-readable-event", lambda s: s.quarantine_event(1, "not broken"), InvalidArgumentError, storage=True, match="not an unreadable event"),
    Case("quarantine-without-a-reason", lambda s: s.quarantine_event(1, ""), InvalidArgumentError, match="must say why"),
    Case("definition-bad-payload-schema", lambda s: s.create_flow(two_steps("g") | {"steps": {**two_steps("g")["steps"], "a": {"index": 0, "step": "a", "service": "s", "transitions": {"go": {"transition": "go", "step": "b", "payloadSchema": {"type": "nonsense"}}}}}}), DefinitionError, match='not a valid JSON Schema'),
    Case("definition-negative-ttl", lambda s: s.create_flow({**linear("g"), "ttl": -5}), DefinitionError, match='ttl must be a positive'),
    Case("definition-existing-flow", lambda s: s.create_flow(linear("f")), FlowExistsError),
    Case("definition-update-changes-flow-id", lambda s: s.update_flow("f", {"flow": "other"}), DefinitionError, match='cannot change'),
    Case("definition-update-unknown-key", lambda s: s.update_flow("f", {"colour": "red"}), DefinitionError, match='colour'),
    # Hostile definitions
    Case("definition-10mb", lambda s: s.create_flow({**linear("g"), "config": {"blob": "x" * 10_000_000}}), DefinitionError, match="over the limit of 262144 bytes"),
    Case("definition-deeply-nested-config", lambda s: s.create_flow({**linear("g"), "config": deep(2000)}), DefinitionError, match="Recursion limit reached"),
    Case("definition-huge-integer", lambda s: s.create_flow({**linear("g"), "config": {"n": 10**30}}), DefinitionError, match="64-bit"),
    Case("definition-huge-step-index", lambda s: s.create_flow(one_step("g", index=10**30)), DefinitionError, match="64-bit"),
    Case("definition-huge-ttl", lambda s: s.create_flow({**linear("g"), "ttl": 10**30}), DefinitionError, match="ttl must be at most"),
    Case("definition-ttl-beyond-year-9999", lambda s: (s.create_flow({**linear("g"), "ttl": 10**12}), s.execute_transition("ann", "g", "next")), DefinitionError, match="ttl must be at most"),
    Case("definition-huge-flow-id", lambda s: s.create_flow(linear("g" * 10_000)), DefinitionError, match=r"flow id 'g+\.\.\.' is longer than 256"),
    Case("definition-long-step-name", lambda s: (s.create_flow(two_steps("g", target=LONG_NAME, step=LONG_NAME)), s.execute_transition("carl", "g", "go")), DefinitionError, storage=True, match=r"step name 'n+\.\.\.' is longer than 256"),
    Case("definition-long-service-name", lambda s: (s.create_flow(one_step("g", service=LONG_NAME)), s.reset_flow("carl", "g")), DefinitionError, storage=True, match=r"service 'n+\.\.\.' is longer than 256"),
    Case("definition-long-transition-name", lambda s: s.create_flow(two_steps("g", name=LONG_NAME)), DefinitionError, match=r"transition name 'n+\.\.\.' is longer than 256"),
    Case("definition-nul-in-flow-id", lambda s: (s.create_flow(linear("g\x00h")), s.execute_transition("carl", "g\x00h", "next")), DefinitionError, storage=True, match='control character'),
    Case("definition-nul-in-step-name", lambda s: (s.create_flow(two_steps("g", target="b\x00", step="b\x00")), s.execute_transition("carl", "g", "go")), DefinitionError, storage=True, match='control character'),
    Case("definition-surrogate-in-flow-id", lambda s: s.create_flow(linear("g\ud800")), DefinitionError, match='control character'),
    Case("definition-surrogate-in-config", lambda s: s.create_flow({**linear("g"), "config": {"x": "\udc80"}}), DefinitionError, match="surrogates not allowed"),
    # Bad arguments
    Case("user-id-empty", lambda s: s.execute_transition("", "f", "next"), InvalidArgumentError),
    Case("user-id-not-a-string", lambda s: s.execute_transition(42, "f", "next"), InvalidArgumentError),  # type: ignore[arg-type]
    Case("user-id-over-256", lambda s: s.execute_transition("u" * 257, "f", "next"), InvalidArgumentError, match='user_id'),
    Case("user-id-megabyte", lambda s: s.reset_flow("u" * 1_000_000, "f"), InvalidArgumentError, match='user_id'),
    Case("flow-id-over-256", lambda s: s.execute_transition("ann", "f" * 257, "next"), InvalidArgumentError, match='flow_id'),
    Case("transition-over-256", lambda s: s.execute_transition("ann", "f", "t" * 257), InvalidArgumentError, match='transition'),
    Case("user-id-nul", lambda s: s.execute_transition("a\x00b", "f", "next"), InvalidArgumentError, storage=True, match='user_id'),
    Case("transition-nul", lambda s: s.execute_transition("ann", "f", "ne\x00xt"), InvalidArgumentError, storage=True, match='transition'),
    Case("override-service-over-256", lambda s: s.set_flow_state("ann", {"flow": "f", "step": "s2", "service": LONG_NAME}), InvalidArgumentError, storage=True, match='service'),
    Case("user-id-surrogate", lambda s: s.execute_transition("a\ud800", "f", "next"), InvalidArgumentError, match='user_id'),
    Case("transition-surrogate", lambda s: s.execute_transition("ann", "f", "\ud800"), InvalidArgumentError, match='transition'),
    Case("override-not-a-state", lambda s: s.set_flow_state("ann", {"flow": "f"}), InvalidArgumentError),
    Case("migrate-version-not-a-number", lambda s: s.migrate_flows("f", "2"), InvalidArgumentError),  # type: ignore[arg-type]
    Case("diagram-unknown-format", lambda s: s.diagram("f", "svg"), InvalidArgumentError),
    # Payloads
    Case("payload-not-an-object", lambda s: s.execute_transition("ann", "f", "next", ["x"]), PayloadValidationError),  # type: ignore[arg-type]
    Case("payload-fails-its-schema", lambda s: s.execute_transition("ann", "schema", "submit", {"name": "x"}), PayloadValidationError, recorded=True, match='email'),
    Case("payload-wrong-type-for-schema", lambda s: s.execute_transition("ann", "schema", "submit", {"email": 5}), PayloadValidationError, recorded=True),
    Case("payload-backtracking-pattern", lambda s: s.execute_transition("ann", "schema", "submit", {"email": "x@y", "name": "a" * 5000 + "!"}), PayloadValidationError, recorded=True, match="does not match"),
    Case("payload-3000-unique-objects", lambda s: s.execute_transition("ann", "schema", "submit", {"email": "x@y", "tags": [{"k": i} for i in range(3000)] + [{"k": 1}]}), PayloadValidationError, recorded=True, match="non-unique"),
    Case("payload-over-64k", lambda s: s.execute_transition("ann", "f", "next", {"x": "y" * 70_000}), PayloadTooLargeError),
    Case("payload-10mb", lambda s: s.execute_transition("ann", "f", "next", {"x": "y" * 10_000_000}), PayloadTooLargeError),
    Case("payload-deeply-nested", lambda s: s.execute_transition("ann", "f", "next", deep(2000)), PayloadValidationError),
    Case("payload-nan", lambda s: s.execute_transition("ann", "f", "next", {"x": float("nan")}), PayloadValidationError),
    Case("payload-bytes", lambda s: s.execute_transition("ann", "f", "next", {"x": b"\xff"}), PayloadValidationError),
    Case("payload-huge-integer", lambda s: s.execute_transition("ann", "f", "next", {"x": 10**30}), PayloadValidationError),
    Case("payload-surrogate", lambda s: s.execute_transition("ann", "f", "next", {"x": "\udc80"}), PayloadValidationError),
    Case("payload-nul-in-value", lambda s: s.execute_transition("ann", "f", "next", {"x": "a\x00b"}), PayloadValidationError, storage=True, match='NUL'),
    Case("payload-nul-in-key", lambda s: s.execute_transition("ann", "f", "next", {"a\x00": 1}), PayloadValidationError, storage=True, match='NUL'),
    Case("payload-non-string-key", lambda s: s.execute_transition("ann", "f", "next", {1: "x"}), PayloadValidationError),  # type: ignore[dict-item]
    Case("override-payload-over-64k", lambda s: s.set_flow_state("ann", {"flow": "f", "step": "s2", "payload": {"x": "y" * 70_000}}), PayloadTooLargeError),
    # Corrupt events in the log (undecodable bytes written straight into the events table)
    Case("corrupt-bytes-get-state", lambda s: s.get_flow_state("ann", "f"), FlowStateCorruptionError, storage=True, corrupt="bytes"),
    Case("corrupt-bytes-transition", lambda s: s.execute_transition("ann", "f", "next"), FlowStateCorruptionError, storage=True, corrupt="bytes"),
    # Verify, rebuild and opening a store skip the unreadable event and name it instead (the
    # projections contain it to its instance): tests/integration/test_unreadable_events.py.
    Case("corrupt-bytes-read-events", lambda s: s.read_events(1, 100), FlowStateCorruptionError, storage=True, corrupt="bytes"),
    Case("corrupt-fields-get-state", lambda s: s.get_flow_state("ann", "f"), FlowStateCorruptionError, corrupt="fields"),
    Case("corrupt-topic-get-state", lambda s: s.get_flow_state("ann", "f"), FlowStateCorruptionError, corrupt="topic"),
]
# fmt: on


# On PostgreSQL a 10 MB append could hang (test_a_10mb_definition_never_hangs_postgres_writers, in a
# subprocess): refused before it is stored now, the row still runs on SQLite only, so that should
# the size limit ever go, a hang cannot stall the table.
SQLITE_ONLY = {"definition-10mb"}


def combinations() -> Iterator[Any]:
    for case in CASES:
        for backend in ("sqlite", "postgres"):
            if backend == "postgres" and (not (case.storage or LONG) or case.id in SQLITE_ONLY):
                continue
            yield pytest.param(case, backend, id=f"{case.id}-{backend}")


@pytest.fixture
def url_for(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[str], str]:
    def make(backend: str) -> str:
        if backend == "sqlite":
            return f"sqlite:///{tmp_path / 'store.db'}"
        return str(request.getfixturevalue("pg_server").create_database())

    return make


def seed(url: str) -> None:
    with FlowStore(url) as store:
        store.create_flow(linear("f"))
        store.create_flow(SCHEMA_FLOW)
        store.execute_transition("ann", "f", "next", {"k": "v"})
        store.reset_flow("bob", "f")
        store.reset_flow("ann", "schema")


def corrupt(url: str, kind: str) -> None:
    """Append an event the store cannot read to ann's instance of "f", behind its back."""
    iid = instance_id("ann", "f")
    with FlowStore(url, live_projections=False) as store:
        state = store.get_flow_state("ann", "f")
        assert state is not None
        version = state.version + 1
    topic, data = "flowstore.domain:TransitionExecuted", b"\xff\xfe\x00garbage"
    if kind == "fields":
        data = b'{"unexpected": true}'
    elif kind == "topic":
        topic, data = "flowstore.nowhere:Vanished", b"{}"
    if url.startswith("sqlite"):
        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as conn:
            conn.execute(
                "INSERT INTO stored_events (originator_id, originator_version, topic, state) "
                "VALUES (?, ?, ?, ?)",
                (iid.hex, version, topic, data),
            )
            conn.commit()
    else:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO flowstore_events (originator_id, originator_version, topic, state) "
                "VALUES (%s, %s, %s, %s)",
                (iid, version, topic, data),
            )


def snapshot(store: FlowStore, tables: SqlProjections) -> Any:
    """Everything a bad call must not change."""
    store.sync_projections(timeout=SYNC_TIMEOUT)
    states = {
        (u, f): (s.to_dict() if (s := store.get_flow_state(u, f)) else None) for u, f in SEEDED
    }
    return {
        "log": store.log_position(),
        "states": states,
        "flows": [f.flow for f in store.list_flows()],
        "tables": tables.snapshot(),
    }


def still_works(store: FlowStore) -> None:
    store.execute_transition("probe", "f", "next")
    store.sync_projections(timeout=SYNC_TIMEOUT)
    assert [h.to_step for h in store.get_flow_history("probe", "f")] == ["s0", "s1"]
    assert store.verify_projections() == []


@pytest.mark.parametrize(("case", "backend"), list(combinations()))
def test_bad_input_gets_its_typed_error_and_changes_nothing(
    case: Case, backend: str, url_for: Callable[[str], str], request: pytest.FixtureRequest
) -> None:
    if case.bug and backend in case.bug_on:
        request.applymarker(pytest.mark.xfail(strict=True, reason=case.bug))
    url = url_for(backend)
    seed(url)
    if case.corrupt:
        corrupt(url, case.corrupt)
    tables = SqlProjections(parse_url(url))
    # With a corrupt event in the log the store cannot project (or even open) with live tables.
    store = FlowStore(url, live_projections=case.corrupt is None)
    try:
        if case.corrupt:  # ann's state is unreadable now; the rest must not move
            before = {"log": store.log_position(), "tables": tables.snapshot()}
        else:
            before = snapshot(store, tables)
        call = (lambda _: FlowStore(url).close()) if case.opens else case.action
        with pytest.raises(case.error, match=case.match):
            call(store)
        if case.corrupt:
            assert {"log": store.log_position(), "tables": tables.snapshot()} == before
            return
        after = snapshot(store, tables)
        if case.recorded:
            # Exactly one event more, the rejection; the state stays as it was (ok included).
            assert after["log"] > before["log"]
            new = [e for n, e in all_events(store) if n > before["log"]]
            assert [type(e) for e in new] == [TransitionRejected]
            (user, flow) = (new[0].user_id, new[0].flow_id)
            old, now = before["states"][(user, flow)], after["states"][(user, flow)]
            assert (now["step"], now["payload"], now["ok"]) == (
                old["step"],
                old["payload"],
                old["ok"],
            )
            assert now["version"] == old["version"] + 1
            others = {k: v for k, v in after["states"].items() if k != (user, flow)}
            assert others == {k: v for k, v in before["states"].items() if k != (user, flow)}
        else:
            assert after == before
        still_works(store)
    finally:
        with contextlib.suppress(Exception):  # a poisoned store cannot finish projecting
            store.close()
        tables.close()


def test_a_deleted_flow_refuses_transitions_and_keeps_its_history(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    seed(url)
    with FlowStore(url) as store:
        store.delete_flow("f")
        position = store.log_position()
        state = store.get_flow_state("ann", "f")
        with pytest.raises(FlowNotFoundError):
            store.execute_transition("ann", "f", "next")
        with pytest.raises(FlowNotFoundError):
            store.reset_flow("ann", "f")
        assert store.log_position() == position
        assert store.get_flow_state("ann", "f") == state
        assert len(store.get_flow_history("ann", "f")) == 2


def test_a_cyclic_definition_is_fine(tmp_path: Path) -> None:
    cyclic = {
        "flow": "cyclic",
        "initialStep": "a",
        "steps": {
            "a": {"index": 0, "step": "a", "service": "s", "transitions": {"go": {"transition": "go", "step": "b"}}},
            "b": {
                "index": 1,
                "step": "b",
                "service": "s",
                "transitions": {
                    "back": {"transition": "back", "step": "a"},
                    "stay": {"transition": "stay", "step": "b"},
                    "end": {"transition": "end", "step": "c"},
                },
            },
            "c": {"index": 2, "step": "c", "service": "s", "transitions": {}},
        },
    }  # fmt: skip
    with FlowStore(f"sqlite:///{tmp_path / 'store.db'}") as store:
        store.create_flow(cyclic)
        for name in ["go", "back", "go", "stay", "stay", "back", "go", "end"]:
            store.execute_transition("ann", "cyclic", name)
        state = store.get_flow_state("ann", "cyclic")
        assert state is not None
        assert (state.step, state.status.value) == ("c", "completed")
        assert store.verify_projections() == []


HOSTILE_BUT_VALID = {
    "sql-in-user-id": ("x'; DROP TABLE stored_events; --", "f", None),
    "sql-in-flow-id": ("ann", "f'); DELETE FROM flow_states; --", None),
    "quotes-and-backslashes": ("a\"b\\c'd", "f", None),
    "unicode-and-emoji": ("ünïcødé-🙂-用户", "f", None),
    "id-of-256-characters": ("u" * 256, "f", None),
    "control-characters-allowed-in-payload-text": ("ann", "f", {"x": "tab\tnew\nline"}),
    "sql-in-payload": ("ann", "f", {"q": "'; DROP TABLE flow_history; --"}),
    "payload-just-under-64k": ("ann", "f", {"x": "y" * 65_000}),
}


@pytest.mark.parametrize(
    ("user", "flow", "payload"), list(HOSTILE_BUT_VALID.values()), ids=list(HOSTILE_BUT_VALID)
)
def test_hostile_but_valid_input_is_stored_verbatim(
    store_url: str, user: str, flow: str, payload: dict[str, Any] | None
) -> None:
    with FlowStore(store_url) as store:
        store.create_flow(linear(flow))
        state = store.execute_transition(user, flow, "next", payload)
        assert (state.user_id, state.flow, state.payload) == (user, flow, payload)
        store.sync_projections(timeout=SYNC_TIMEOUT)
        history = store.get_flow_history(user, flow)
        assert [(h.user_id, h.flow_id, h.payload) for h in history[1:]] == [(user, flow, payload)]
        assert [s.flow for s in store.get_user_flows(user)] == [flow]
        assert store.verify_projections() == []
    with FlowStore(store_url) as reopened:  # the tables and the log are all still there
        assert reopened.get_flow_state(user, flow) == state
        assert [f.flow for f in reopened.list_flows()] == [flow]


HUGE_DEFINITION = """
import sys
import orjson
from flowstore import DefinitionError, FlowStore
from flowstore.definitions import MAX_DEFINITION_BYTES, parse_definition
from tests.flows import linear


def with_blob(flow, size):
    return {**linear(flow), "config": {"blob": "x" * size}}


# The largest definition accepted: its event is as large as a definition's event can get.
empty = len(orjson.dumps(parse_definition(with_blob("largest", 0)).model_dump()))
largest = with_blob("largest", MAX_DEFINITION_BYTES - empty)
with FlowStore(sys.argv[1], live_projections=False) as store:
    store.create_flow(linear("small"))
    position = store.log_position()
    try:
        store.create_flow(with_blob("big", 10_000_000))
    except DefinitionError as exc:
        print("refused", exc.problems, flush=True)
    assert store.log_position() == position, "the refused definition wrote something"
    store.create_flow(largest)
print("done", flush=True)
"""


@pytest.mark.skipif(not LONG, reason="long variant: 10 PostgreSQL databases")
def test_a_10mb_definition_never_hangs_postgres_writers(pg_server: Any) -> None:
    # Appending a 6-10 MB event hung about a third of the time in psycopg's pipeline mode
    # (eventsourcing's insert_events: pipeline.sync() waited while the server waited in ClientRead),
    # holding LOCK TABLE ... IN EXCLUSIVE MODE on the events table, so every writer of the database
    # blocked until the process died. Such a definition is refused now before anything is written;
    # the largest one accepted must append without hanging, and other writers go on.
    for _ in range(10):
        url = pg_server.create_database()
        with subprocess.Popen(
            [sys.executable, "-c", HUGE_DEFINITION, url],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ) as process:
            try:
                out, err = process.communicate(timeout=15)  # it takes well under a second
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()
                pytest.fail("a definition append hung the PostgreSQL writer for 15 s")
        assert process.returncode == 0, err
        assert "over the limit of" in out, out  # printed when refused with DefinitionError
        assert "done" in out, out
        with FlowStore(url) as store:  # another writer: not blocked by a lock left behind
            store.execute_transition("ann", "small", "next")
            assert [f.flow for f in store.list_flows()] == ["small", "largest"]
            assert store.verify_projections() == []
