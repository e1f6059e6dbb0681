"""The `flowstore` command line: run in-process through `main`, and as the installed console script."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from importlib.resources import files
from pathlib import Path
from typing import Any

import orjson
import pytest

from flowstore import (
    FlowExistsError,
    FlowNotFoundError,
    FlowStateNotFoundError,
    InvalidTransitionError,
    StorageConfigError,
)
from flowstore.adapters.cli import main
from flowstore.adapters.errors import mapping_for
from tests.owlmeans import FIXTURES

FLOW = "user-onboarding"
SEED = files("flowstore").joinpath("data/user-onboarding.json").read_text(encoding="utf-8")

NOT_FOUND = mapping_for(FlowNotFoundError("x")).exit_code
NO_STATE = mapping_for(FlowStateNotFoundError("u", "x")).exit_code
EXISTS = mapping_for(FlowExistsError("x")).exit_code
INVALID = mapping_for(
    InvalidTransitionError("welcome", "complete", flow_id=FLOW, user_id="u")
).exit_code
STORAGE = mapping_for(StorageConfigError("x")).exit_code
USAGE = 2


@pytest.fixture(autouse=True)
def _piped_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tables as piped output gets them (120 columns): pytest-xdist's workers set COLUMNS=80,
    which would cut the cells these tests read."""
    monkeypatch.delenv("COLUMNS", raising=False)


@pytest.fixture
def url(tmp_path: Path) -> str:
    """A fresh SQLite store for each test."""
    return f"sqlite:///{tmp_path}/x.db"


@pytest.fixture
def flow_file(tmp_path: Path) -> Path:
    """The seed's onboarding flow as a file."""
    path = tmp_path / "flow.json"
    path.write_text(SEED, encoding="utf-8")
    return path


@pytest.fixture
def created(url: str, flow_file: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """A store with the onboarding flow in it; its URL."""
    assert main(["--url", url, "flows", "create", str(flow_file)]) == 0
    capsys.readouterr()
    return url


def cli_json(capsys: pytest.CaptureFixture[str], url: str, *args: str) -> Any:
    """Run a command with --json; it must succeed and print nothing but JSON."""
    code = main(["--url", url, "--json", *args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return orjson.loads(out)


def cli_fails(capsys: pytest.CaptureFixture[str], url: str, *args: str) -> tuple[int, str]:
    """Run a command that must fail: its exit code and its stderr (stdout must stay empty)."""
    code = main(["--url", url, *args])
    out, err = capsys.readouterr()
    assert out == ""
    return code, err


def test_create_then_list_and_show(
    url: str, flow_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--url", url, "flows", "create", str(flow_file)]) == 0
    out = capsys.readouterr().out
    assert f"{FLOW} v1" in out
    assert "continue → preferences" in out

    assert main(["--url", url, "flows", "list"]) == 0
    assert FLOW in capsys.readouterr().out

    # --json is accepted before or after the command.
    for args in (["--json", "flows", "list"], ["flows", "list", "--json"]):
        assert main(["--url", url, *args]) == 0
        flows = orjson.loads(capsys.readouterr().out)
        assert [(f["flow"], f["version"], f["initialStep"]) for f in flows] == [
            (FLOW, 1, "welcome")
        ]

    shown = cli_json(capsys, url, "flows", "show", FLOW)
    seed = orjson.loads(SEED)
    assert shown == {**seed, "version": 1}


def test_create_from_stdin_and_twice(
    url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(SEED))
    created = cli_json(capsys, url, "flows", "create", "-")
    assert (created["flow"], created["version"]) == (FLOW, 1)

    monkeypatch.setattr(sys, "stdin", io.StringIO(SEED))
    code, err = cli_fails(capsys, url, "flows", "create", "-")
    assert code == EXISTS
    assert err.startswith("error[FLOW_EXISTS]: ")


def test_create_from_a_file_that_is_not_json(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    code, err = cli_fails(capsys, url, "flows", "create", str(bad))
    assert code == USAGE
    assert "not valid JSON" in err
    assert not Path(
        url.removeprefix("sqlite:///")
    ).exists()  # nothing was opened, let alone written


def test_update_makes_a_new_version(
    created: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    changes = tmp_path / "changes.json"
    changes.write_text('{"ttl": 60}', encoding="utf-8")
    updated = cli_json(capsys, created, "flows", "update", FLOW, str(changes))
    assert (updated["version"], updated["ttl"]) == (2, 60)
    assert cli_json(capsys, created, "flows", "show", FLOW)["version"] == 2
    first = cli_json(capsys, created, "flows", "show", FLOW, "--version", "1")
    assert first["version"] == 1
    assert "ttl" not in first
    code, err = cli_fails(capsys, created, "flows", "show", FLOW, "--version", "3")
    assert code == NOT_FOUND
    assert err.startswith("error[FLOW_NOT_FOUND]: ")


def test_transition_and_history(created: str, capsys: pytest.CaptureFixture[str]) -> None:
    state = cli_json(capsys, created, "transition", "ada", FLOW, "start")
    assert (state["userId"], state["step"], state["status"]) == ("ada", "profile-setup", "active")
    payload = '{"displayName": "Ada"}'
    state = cli_json(capsys, created, "transition", "ada", FLOW, "continue", "--payload", payload)
    assert state["step"] == "preferences"
    assert state["payload"] == {"displayName": "Ada"}

    rows = cli_json(capsys, created, "history", "ada", FLOW)
    assert [(r["kind"], r["transition"], r["fromStep"], r["toStep"]) for r in rows] == [
        ("start", "", "", "welcome"),
        ("transition", "start", "welcome", "profile-setup"),
        ("transition", "continue", "profile-setup", "preferences"),
    ]
    assert rows[-1]["payload"] == {"displayName": "Ada"}
    assert all(r["success"] for r in rows)

    assert main(["--url", created, "history", "ada", FLOW]) == 0
    out = capsys.readouterr().out
    assert "History of ada" in out
    assert "preferences" in out


def test_invalid_transition_is_reported_and_recorded(
    created: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cli_json(capsys, created, "transition", "bob", FLOW, "start")
    code, err = cli_fails(capsys, created, "transition", "bob", FLOW, "save")
    assert code == INVALID
    assert err.startswith("error[INVALID_TRANSITION]: ")
    assert "'save'" in err
    assert "Traceback" not in err
    assert err.count("\n") == 1  # one line

    rows = cli_json(capsys, created, "history", "bob", FLOW)
    assert (rows[-1]["transition"], rows[-1]["success"]) == ("save", False)
    state = cli_json(capsys, created, "state", "get", "bob", FLOW)
    assert (state["step"], state["ok"]) == ("profile-setup", True)  # a refusal changes nothing


@pytest.mark.parametrize(
    "args",
    [
        ["transition", "u", "nosuch", "start"],
        ["flows", "show", "nosuch"],
        ["flows", "delete", "nosuch"],
        ["state", "get", "u", "nosuch"],
        ["history", "u", "nosuch"],
        ["reset", "u", "nosuch"],
        ["stats", "--flow", "nosuch"],
    ],
)
def test_unknown_flow(created: str, args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, err = cli_fails(capsys, created, *args)
    assert code == NOT_FOUND
    assert err.startswith("error[FLOW_NOT_FOUND]: ")
    assert "nosuch" in err


@pytest.mark.parametrize("payload", ["{bad", "[1, 2]", '"text"', "null", "3"])
def test_bad_payload_is_a_usage_error(
    created: str, payload: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = cli_fails(capsys, created, "transition", "eve", FLOW, "start", "--payload", payload)
    assert code == USAGE
    assert "--payload" in err
    # The command did not run.
    code, err = cli_fails(capsys, created, "state", "get", "eve", FLOW)
    assert code == NO_STATE
    assert err.startswith("error[FLOW_STATE_NOT_FOUND]: ")


def test_state_set_list_clear_and_reset(created: str, capsys: pytest.CaptureFixture[str]) -> None:
    state = cli_json(
        capsys,
        created,
        *("state", "set", "cy", FLOW, "verification", "--payload", '{"code": 42}', "--not-ok"),
    )
    assert (state["step"], state["ok"], state["payload"]) == ("verification", False, {"code": 42})
    assert state["service"] == "onboarding"
    listed = cli_json(capsys, created, "state", "list", "cy")
    assert [(s["flow"], s["step"]) for s in listed] == [(FLOW, "verification")]

    reset = cli_json(capsys, created, "reset", "cy", FLOW, "--step", "preferences")
    assert (reset["step"], reset["ok"]) == ("preferences", True)

    assert main(["--url", created, "state", "clear", "cy", FLOW]) == 0
    assert "Cleared" in capsys.readouterr().out
    assert cli_json(capsys, created, "state", "list", "cy") == []
    code, _ = cli_fails(capsys, created, "state", "get", "cy", FLOW)
    assert code == NO_STATE
    code, err = cli_fails(capsys, created, "state", "set", "cy", FLOW, "nowhere")
    assert err.startswith("error[INVALID_STEP]: ")


def test_stats_json_totals(created: str, capsys: pytest.CaptureFixture[str]) -> None:
    for transition in ("start", "continue", "save", "complete"):
        cli_json(capsys, created, "transition", "a", FLOW, transition)
    cli_json(capsys, created, "transition", "b", FLOW, "start")
    code, _ = cli_fails(capsys, created, "transition", "b", FLOW, "complete")
    assert code == INVALID
    for transition in ("start", "skip"):
        cli_json(capsys, created, "transition", "c", FLOW, transition)

    for args in (["stats"], ["stats", "--flow", FLOW]):
        stats = cli_json(capsys, created, *args)
        assert stats["totalFlows"] == 3
        assert stats["activeUsers"] == 2  # b and c
        assert stats["completionRate"] == pytest.approx(1 / 3)
        assert stats["errorRate"] == pytest.approx(1 / 8)  # 8 transitions, 1 rejected
        assert {s["step"]: s["count"] for s in stats["popularSteps"]} == {
            "welcome": 3,
            "profile-setup": 3,
            "verification": 2,
            "preferences": 1,
            "completed": 1,
        }
    assert cli_json(capsys, created, "purge") == {"purged": 0}


def test_delete_flow(created: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_json(capsys, created, "flows", "delete", FLOW) == {"flow": FLOW, "deleted": True}
    assert cli_json(capsys, created, "flows", "list") == []
    code, _ = cli_fails(capsys, created, "transition", "u", FLOW, "start")
    assert code == NOT_FOUND


def test_url_from_environment(
    created: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FLOWSTORE_URL", created)
    assert main(["--json", "flows", "list"]) == 0
    assert [f["flow"] for f in orjson.loads(capsys.readouterr().out)] == [FLOW]


def test_bad_url_is_a_storage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = cli_fails(capsys, f"sqlite:///{tmp_path}/missing/x.db", "flows", "list")
    assert code == 6
    assert err.startswith("error[STORAGE_CONFIG_INVALID]: ")


def test_demo_is_deterministic_from_its_seed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def outcome(name: str) -> tuple[Any, ...]:
        stats = cli_json(capsys, f"sqlite:///{tmp_path}/{name}.db", "demo", "--users", "25")
        return (
            stats["totalFlows"],
            stats["completionRate"],
            stats["errorRate"],
            stats["popularSteps"],
        )

    first = outcome("one")
    assert first == outcome("two")
    assert first[0] == 25
    assert 0 < first[1] < 1  # some users stall
    assert first[2] > 0  # some send invalid transitions


def _console_script() -> str:
    beside = Path(sys.executable).with_name("flowstore")
    script = str(beside) if beside.exists() else shutil.which("flowstore")
    assert script is not None, "the flowstore console script is not installed"
    return script


def test_demo_console_script(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path}/demo.db"
    env = {k: v for k, v in os.environ.items() if k != "FLOWSTORE_URL"}
    command = [_console_script(), "--url", url, "demo", "--users", "30"]
    for run in ("created", "reused"):  # the demo can run again on the same database
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        out = done.stdout
        assert run in out
        for text in ("History of", "Total flows", "Completion rate", "p95 response time"):
            assert text in out
        assert "Popular steps" in out
        assert "commands/s" in out
    # The second run used fresh users: 30 more runs started, none collided with the first 30.
    assert cli_json(capsys, url, "stats")["totalFlows"] == 60


def test_errors_under_json_are_one_object_on_stdout(
    created: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["--url", created, "--json", "transition", "ann", FLOW, "complete"])
    out, err = capsys.readouterr()
    assert code == INVALID
    error = orjson.loads(out)
    assert error["code"] == "INVALID_TRANSITION"
    assert "complete" in error["message"]
    assert error["details"]["transition"] == "complete"
    assert err == ""


def test_a_postgresql_url_without_the_extra_names_the_pip_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if not installed: find_spec gives None
    code = main(["--url", "postgresql://u:secret@127.0.0.1:1/db", "transition", "ann", FLOW, "go"])
    _out, err = capsys.readouterr()
    assert code == STORAGE
    assert err.startswith("error[STORAGE_CONFIG_INVALID]: ")
    assert "pip install 'flowstore-es[postgres]'" in err
    assert "secret" not in err
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "command",
    [
        ["flows", "list"],
        ["flows", "show", FLOW],
        ["state", "get", "ann", FLOW],
        ["state", "list", "ann"],
        ["history", "ann", FLOW],
        ["stats"],
        ["funnel", FLOW],
        ["projections", "status"],
        ["projections", "verify"],
    ],
)
def test_read_only_commands_never_create_a_database(
    tmp_path: Path, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    typo = tmp_path / "typo.db"
    code, err = cli_fails(capsys, f"sqlite:///{typo}", *command)
    assert code == STORAGE
    assert err.startswith("error[STORAGE_CONFIG_INVALID]: No database at ")
    assert list(tmp_path.iterdir()) == []


def test_flows_create_accepts_yaml(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    path = tmp_path / "flow.yaml"
    path.write_text(yaml.safe_dump(orjson.loads(SEED)), encoding="utf-8")
    assert cli_json(capsys, url, "flows", "create", str(path))["flow"] == FLOW
    bad = tmp_path / "bad.yml"
    bad.write_text("- just\n- a list\n", encoding="utf-8")
    code, err = cli_fails(capsys, url, "flows", "create", str(bad))
    assert code == USAGE
    assert "must be a YAML mapping" in err


def test_diagram_formats_match_the_adapter() -> None:
    from flowstore.adapters.cli import DIAGRAM_FORMATS
    from flowstore.adapters.diagrams import OUTPUT_FORMATS

    assert tuple(DIAGRAM_FORMATS) == tuple(OUTPUT_FORMATS)


def test_help_imports_nothing_heavy() -> None:
    # `flowstore --help` and usage errors stay fast: the CLI module pulls in no storage, pydantic,
    # rich or HTTP code until a command runs (benchmarks/cold_start.py reports the seconds).
    code = (
        "import sys; from flowstore.adapters.cli import main; main(['--help'])\n"
        "heavy = ('eventsourcing', 'sqlalchemy', 'pydantic', 'rich', 'jsonschema', 'yaml', 'httpx')\n"
        "print(sorted(m for m in heavy if m in sys.modules), file=sys.stderr)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stderr.strip().splitlines()[-1] == "[]"
    assert "flows" in done.stdout


def test_instances_history_pages_and_windows(
    created: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for user in ("ann", "bob", "cat"):
        cli_json(capsys, created, "transition", user, FLOW, "start")
    page = cli_json(capsys, created, "instances", FLOW, "--step", "profile-setup", "--limit", "2")
    assert [s["userId"] for s in page["instances"]] == ["ann", "bob"]
    rest = cli_json(capsys, created, "instances", FLOW, "--cursor", page["nextCursor"])
    assert [s["userId"] for s in rest["instances"]] == ["cat"]
    assert rest["nextCursor"] is None
    idle = cli_json(capsys, created, "instances", FLOW, "--idle-for", "86400")
    assert idle["instances"] == []
    assert main(["--url", created, "instances", FLOW]) == 0
    assert "3 instance(s); last page" in capsys.readouterr().out

    first = cli_json(capsys, created, "history", "ann", FLOW, "--limit", "1")
    assert [r["kind"] for r in first] == ["start"]
    after = cli_json(capsys, created, "history", "ann", FLOW, "--after", first[0]["id"])
    assert [r["kind"] for r in after] == ["transition"]
    only = cli_json(capsys, created, "history", "ann", FLOW, "--kind", "transition")
    assert [r["transition"] for r in only] == ["start"]

    window = ("--since", "2000-01-01T00:00:00", "--until", "2000-01-02T00:00:00+00:00")
    assert cli_json(capsys, created, "stats", "--flow", FLOW, *window)["totalFlows"] == 0
    assert cli_json(capsys, created, "stats", "--flow", FLOW)["totalFlows"] == 3
    funnel = cli_json(capsys, created, "funnel", FLOW, "--since", "2000-01-01")
    assert {s["step"]: s["entered"] for s in funnel}["welcome"] == 3
    code, err = cli_fails(capsys, created, "stats", "--since", "yesterday")
    assert code == USAGE
    assert "ISO 8601" in err


def test_owlmeans_commands_hand_a_flow_over_by_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path}/owl.db"
    flow = FIXTURES / "_oa.json"
    assert main(["--url", url, "flows", "create", str(flow)]) == 0
    capsys.readouterr()
    cli_json(capsys, url, "reset", "ann", "_oa", "--service", "portal", "--entity", "org-1")
    offered = cli_json(capsys, url, "transitions", "ann", "_oa", "--explicit")
    assert [t["step"] for t in offered] == ["signup", "signin"]
    assert cli_json(capsys, url, "transitions", "ann", "_oa", "--implicit") == []
    state = cli_json(
        capsys, url, "transition", "ann", "_oa", "signup", "--not-ok", "--message", "retry"
    )
    assert (state["previous"], state["ok"], state["message"]) == ("choice", False, "retry")
    token = cli_json(capsys, url, "state", "token", "ann", "_oa")["token"]
    adopted = cli_json(capsys, url, "state", "adopt", "bob", token, "--sender", "idp")
    assert (adopted["step"], adopted["service"], adopted["entityId"]) == (
        "signup",
        "portal",
        "org-1",
    )
    assert cli_json(capsys, url, "back", "bob", "_oa")["step"] == "choice"
    history = cli_json(capsys, url, "history", "bob", "_oa")
    assert [h["kind"] for h in history] == ["handoff", "back"]
    code, err = cli_fails(capsys, url, "state", "adopt", "bob", "not-a-token")
    assert code == INVALID
    assert "STATE_TOKEN_MALFORMED" in err
    # For people, the token alone (to paste into a URL).
    assert main(["--url", url, "state", "token", "ann", "_oa"]) == 0
    assert capsys.readouterr().out.strip() == token
