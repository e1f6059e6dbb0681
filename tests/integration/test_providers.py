"""Flow-definition providers: database, file, remote (a real local HTTP server), hybrid; loading."""

from __future__ import annotations

import base64
import json
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from flowstore import (
    DefinitionError,
    FlowDefinition,
    FlowNotFoundError,
    FlowStore,
    InvalidArgumentError,
)
from flowstore.adapters.cli import main
from flowstore.adapters.providers import (
    Authentication,
    CachedFlowProvider,
    FlowProviderConfig,
    config_from_seed,
    load_flows,
    make_flow_provider,
    read_definitions,
)
from flowstore.definitions import parse_definition
from tests.flows import linear, onboarding

FLOW = "user-onboarding"


class Ticker:
    """A monotonic clock (seconds) that moves only when the test moves it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def ticker() -> Ticker:
    return Ticker()


# A real HTTP server on 127.0.0.1, whose answers each test sets.


@dataclass
class Answer:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    location: str | None = None


@dataclass
class FlowServer:
    """Serves `routes` (path -> Answer); answers 401 when a header in `required` is missing."""

    port: int = 0
    routes: dict[str, Answer] = field(default_factory=dict)
    required: dict[str, str] = field(default_factory=dict)
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    stop: Callable[[], None] = lambda: None
    """Shut the server down (idempotent): later requests are refused."""

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def serve(self, path: str, data: Any, *, status: int = 200) -> None:
        body = data if isinstance(data, bytes) else json.dumps(data).encode()
        self.routes[path] = Answer(status, body)


@pytest.fixture
def server() -> Iterator[FlowServer]:
    state = FlowServer()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            state.requests.append((self.path, dict(self.headers)))
            if any(self.headers.get(k) != v for k, v in state.required.items()):
                answer = Answer(401, b'{"error": "unauthorized"}')
            else:
                answer = state.routes.get(path, Answer(404, b'{"error": "not found"}'))
            self.send_response(answer.status)
            self.send_header("Content-Type", answer.content_type)
            if answer.location is not None:
                self.send_header("Location", answer.location)
            self.send_header("Content-Length", str(len(answer.body)))
            self.end_headers()
            self.wfile.write(answer.body)

        def log_message(self, *args: Any) -> None:  # keep pytest's output clean
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = httpd.server_address[1]
    # A short poll interval: shutdown() waits for the serving loop to notice, every test.
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    stopped = threading.Event()

    def stop() -> None:
        if not stopped.is_set():
            stopped.set()
            httpd.shutdown()
            httpd.server_close()
            thread.join(timeout=10)

    state.stop = stop
    yield state
    stop()


def remote(url: str, ticker: Ticker, **extra: Any) -> FlowProviderConfig:
    return FlowProviderConfig(
        source="remote", remote_url=url, cache_timeout=60, clock=ticker, timeout=5, **extra
    )


# File


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_file_provider_reads_json_yaml_and_folders(tmp_path: Path, ticker: Ticker) -> None:
    write_json(tmp_path / "onboarding.json", onboarding())
    (tmp_path / "more.yaml").write_text(
        yaml.safe_dump({"flows": [linear("alpha"), linear("beta", steps=2)]}), encoding="utf-8"
    )
    (tmp_path / "notes.txt").write_text("not a flow", encoding="utf-8")
    with make_flow_provider(
        FlowProviderConfig(source="file", file_path=tmp_path, clock=ticker)
    ) as folder:
        assert folder.get_flow(FLOW).to_seed() == onboarding()
        assert folder.get_flow("beta").initial_step == "s0"
        assert sorted(d.flow for d in folder.list_flows()) == ["alpha", "beta", FLOW]
    single = make_flow_provider(
        FlowProviderConfig(source="file", file_path=tmp_path / "more.yaml", clock=ticker)
    )
    assert single.get_flow("alpha").flow == "alpha"
    with pytest.raises(FlowNotFoundError) as caught:
        single.get_flow(FLOW)
    assert f"file:{tmp_path / 'more.yaml'}" in caught.value.message
    assert caught.value.details["source"] == single.name


def test_file_cache_expires_after_its_timeout(tmp_path: Path, ticker: Ticker) -> None:
    path = write_json(tmp_path / "flow.json", linear("f", ttl=10))
    provider = make_flow_provider(
        FlowProviderConfig(source="file", file_path=path, cache_timeout=30, clock=ticker)
    )
    assert provider.get_flow("f").ttl == 10
    write_json(path, linear("f", ttl=20))
    ticker.advance(29)
    assert provider.get_flow("f").ttl == 10  # still fresh
    ticker.advance(2)
    assert provider.get_flow("f").ttl == 20
    write_json(path, linear("other"))  # f is gone from the file
    ticker.advance(31)
    with pytest.raises(FlowNotFoundError, match="not found in file:"):
        provider.get_flow("f")
    provider.invalidate()
    assert [d.flow for d in provider.list_flows()] == ["other"]


def test_a_broken_file_keeps_serving_the_last_good_copy(
    tmp_path: Path, ticker: Ticker, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_json(tmp_path / "flow.json", linear("f"))
    provider = make_flow_provider(
        FlowProviderConfig(source="file", file_path=path, cache_timeout=5, clock=ticker)
    )
    assert provider.get_flow("f").flow == "f"
    bad = linear("f")
    bad["steps"]["s0"]["transitions"]["next"]["step"] = "nowhere"
    write_json(path, bad)
    ticker.advance(10)
    with caplog.at_level(logging.WARNING, logger="flowstore.adapters.providers"):
        assert provider.get_flow("f").steps["s0"].transitions["next"].step == "s1"
    assert "unavailable" in caplog.text
    assert "nowhere" in caplog.text
    with pytest.raises(FlowNotFoundError) as caught:
        provider.get_flow("never-seen")
    assert "is unavailable" in caught.value.message
    assert "nowhere" in caught.value.message


def test_read_definitions_lists_every_problem_with_its_file(tmp_path: Path) -> None:
    write_json(tmp_path / "a.json", linear("f"))
    write_json(tmp_path / "b.json", [linear("f"), {"flow": "g"}])
    (tmp_path / "c.yaml").write_text("steps: [unclosed", encoding="utf-8")
    with pytest.raises(DefinitionError) as caught:
        read_definitions(tmp_path)
    problems = caught.value.problems
    assert any("'f' is defined in both" in p and "a.json" in p and "b.json" in p for p in problems)
    assert any("b.json item 1 flow 'g'" in p and "initialStep" in p for p in problems)
    assert any("c.yaml: not valid YAML" in p for p in problems)
    with pytest.raises(FileNotFoundError):
        read_definitions(tmp_path / "missing.json")


# Database


def test_database_provider_sees_updates_through_the_store_at_once(
    store_url: str, ticker: Ticker
) -> None:
    with FlowStore(store_url) as store:
        store.create_flow(onboarding())
        provider = make_flow_provider(
            FlowProviderConfig(source="database", store=store, cache_timeout=3600, clock=ticker)
        )
        assert provider.get_flow(FLOW).version == 1
        store.update_flow(FLOW, {"ttl": 60})
        assert provider.get_flow(FLOW).version == 2  # no wait: the store told the provider
        assert provider.get_flow(FLOW).ttl == 60
        store.delete_flow(FLOW)
        with pytest.raises(FlowNotFoundError, match="not found in database:"):
            provider.get_flow(FLOW)
        store.create_flow(onboarding())
        assert [d.version for d in provider.list_flows()] == [3]
        provider.close()
        store.update_flow(FLOW, {"ttl": 5})  # a closed provider is no longer told


def test_database_provider_sees_other_processes_changes_when_the_cache_expires(
    store_url: str, ticker: Ticker
) -> None:
    with FlowStore(store_url) as store:
        store.create_flow(onboarding())
    config = FlowProviderConfig(
        source="database", connection_string=store_url, cache_timeout=10, clock=ticker
    )
    with make_flow_provider(config) as provider, FlowStore(store_url) as elsewhere:
        assert provider.get_flow(FLOW).version == 1
        elsewhere.update_flow(FLOW, {"ttl": 60})  # another store object: the cache is not told
        assert provider.get_flow(FLOW).version == 1
        ticker.advance(11)
        assert provider.get_flow(FLOW).version == 2


def test_a_fetch_overtaken_by_an_invalidation_is_not_cached(ticker: Ticker) -> None:
    """An update that lands while a fetch is under way must not be hidden for a whole timeout."""

    class Racing:
        name, whole, can_list = "racing", False, True

        def __init__(self) -> None:
            self.ttl = 1
            self.fetches = 0
            self.provider: CachedFlowProvider | None = None

        def fetch(self, flow_id: str | None) -> dict[str, FlowDefinition]:
            self.fetches += 1
            old = parse_definition(linear("f", ttl=self.ttl))
            if self.fetches == 1:  # the store changes the flow after we read it
                self.ttl = 2
                assert self.provider is not None
                self.provider.invalidate("f")
            return {"f": old}

        def close(self) -> None:
            pass

    fetcher = Racing()
    provider = CachedFlowProvider(fetcher, cache_timeout=3600, clock=ticker)
    fetcher.provider = provider
    assert provider.get_flow("f").ttl == 1  # what the fetch read, returned...
    assert provider.get_flow("f").ttl == 2  # ...but not cached: the next call asks again
    assert provider.get_flow("f").ttl == 2
    assert fetcher.fetches == 2


# Remote


def test_remote_provider_reads_a_document_and_caches_it(server: FlowServer, ticker: Ticker) -> None:
    server.serve("/flows", {"flows": [onboarding(), linear("alpha")]})
    provider = make_flow_provider(remote(server.url("/flows"), ticker))
    assert provider.get_flow(FLOW).to_seed() == onboarding()
    assert provider.get_flow("alpha").flow == "alpha"
    assert len(server.requests) == 1  # one document, cached
    server.serve("/flows", [linear("alpha", ttl=9)])
    ticker.advance(61)
    assert provider.get_flow("alpha").ttl == 9
    with pytest.raises(FlowNotFoundError, match=f"not found in remote:{server.url('/flows')}"):
        provider.get_flow(FLOW)
    provider.close()


def test_remote_yaml_answers_are_read_too(server: FlowServer, ticker: Ticker) -> None:
    server.routes["/flow.yaml"] = Answer(
        body=yaml.safe_dump(linear("y")).encode(), content_type="application/yaml"
    )
    assert make_flow_provider(remote(server.url("/flow.yaml"), ticker)).get_flow("y").flow == "y"


@pytest.mark.parametrize(
    ("authentication", "header", "value"),
    [
        (Authentication("bearer", "t0ken"), "Authorization", "Bearer t0ken"),
        (
            Authentication("basic", "ann:s3cret"),
            "Authorization",
            "Basic " + base64.b64encode(b"ann:s3cret").decode(),
        ),
        (Authentication("apikey", "k3y"), "X-API-Key", "k3y"),
        (Authentication("apikey", "k3y", header="X-Flows-Key"), "X-Flows-Key", "k3y"),
    ],
    ids=["bearer", "basic", "apikey", "apikey-custom-header"],
)
def test_remote_authentication(
    server: FlowServer, ticker: Ticker, authentication: Authentication, header: str, value: str
) -> None:
    server.serve("/flows", [linear("alpha")])
    server.required = {header: value}
    provider = make_flow_provider(
        remote(server.url("/flows"), ticker, authentication=authentication)
    )
    assert provider.get_flow("alpha").flow == "alpha"
    assert server.requests[-1][1][header] == value
    # Wrong credentials: the server says 401, and a flow never seen is a clear error.
    wrong = Authentication(authentication.type, "wrong:creds", header=authentication.header)
    refused = make_flow_provider(remote(server.url("/flows"), ticker, authentication=wrong))
    with pytest.raises(FlowNotFoundError) as caught:
        refused.get_flow("alpha")
    assert "HTTP 401" in caught.value.message
    assert "wrong" not in caught.value.message  # credentials stay out of messages
    assert "creds" not in repr(wrong)


def test_remote_per_flow_urls_ask_once_per_flow(server: FlowServer, ticker: Ticker) -> None:
    server.serve("/flows/user-onboarding", onboarding())
    server.serve("/flows/a%20b", linear("a b"))
    provider = make_flow_provider(remote(server.url("/flows/{flow_id}"), ticker))
    assert provider.get_flow(FLOW).flow == FLOW
    assert provider.get_flow("a b").flow == "a b"
    assert [path for path, _ in server.requests] == ["/flows/user-onboarding", "/flows/a%20b"]
    with pytest.raises(FlowNotFoundError, match="'missing' not found in remote:"):
        provider.get_flow("missing")  # 404: the server says there is no such flow
    assert sorted(d.flow for d in provider.list_flows()) == ["a b", FLOW]  # fetched so far


@pytest.mark.parametrize(
    "failure",
    ["500", "html", "not-a-definition", "wrong-shape", "server-gone"],
)
def test_a_failing_remote_keeps_serving_the_last_good_copy(
    server: FlowServer, ticker: Ticker, caplog: pytest.LogCaptureFixture, failure: str
) -> None:
    server.serve("/flows", [onboarding()])
    provider = make_flow_provider(remote(server.url("/flows"), ticker))
    assert provider.get_flow(FLOW).version is None
    if failure == "500":
        server.serve("/flows", {"error": "boom"}, status=500)
    elif failure == "html":
        server.serve("/flows", b"<html>maintenance</html>")
    elif failure == "not-a-definition":
        server.serve("/flows", [{"flow": FLOW, "initialStep": "x", "steps": {}}])
    elif failure == "wrong-shape":
        server.serve("/flows", 42)
    else:
        server.stop()  # connection refused from now on
    ticker.advance(61)
    with caplog.at_level(logging.WARNING, logger="flowstore.adapters.providers"):
        assert provider.get_flow(FLOW).to_seed() == onboarding()
    assert "serving the cached copy" in caplog.text
    with pytest.raises(FlowNotFoundError) as caught:
        provider.get_flow("never-seen")
    assert "remote:" in caught.value.message
    assert "unavailable" in caught.value.message
    # Back to health: the next refresh (after another timeout) picks up the new definition.
    if failure != "server-gone":
        server.serve("/flows", [onboarding() | {"ttl": 30}])
        ticker.advance(61)
        assert provider.get_flow(FLOW).ttl == 30


def test_remote_names_hide_credentials(server: FlowServer, ticker: Ticker) -> None:
    url = f"http://user:pw@127.0.0.1:{server.port}/flows?token=secret"
    provider = make_flow_provider(remote(url, ticker))
    assert provider.name == f"remote:http://127.0.0.1:{server.port}/flows"
    with pytest.raises(InvalidArgumentError):
        make_flow_provider(remote("ftp://example.invalid/flows", ticker))
    with pytest.raises(InvalidArgumentError, match="user:password"):
        make_flow_provider(
            remote(server.url("/f"), ticker, authentication=Authentication("basic", "no-colon"))
        )


# Hybrid


def test_hybrid_asks_sources_in_order(tmp_path: Path, server: FlowServer, ticker: Ticker) -> None:
    write_json(tmp_path / "local.json", [linear("shared", ttl=1), linear("local-only")])
    server.serve("/flows", [linear("shared", ttl=2), linear("remote-only")])
    provider = make_flow_provider(
        FlowProviderConfig(
            source="hybrid",
            sources=[
                FlowProviderConfig(source="file", file_path=tmp_path, clock=ticker),
                remote(server.url("/flows"), ticker),
            ],
        )
    )
    assert provider.get_flow("shared").ttl == 1  # the first source wins
    assert provider.get_flow("remote-only").flow == "remote-only"
    assert sorted((d.flow, d.ttl) for d in provider.list_flows()) == [
        ("local-only", None),
        ("remote-only", None),
        ("shared", 1),
    ]
    with pytest.raises(FlowNotFoundError) as caught:
        provider.get_flow("nowhere")
    assert len(caught.value.details["reasons"]) == 2  # each source's answer, in order
    assert "hybrid(file:" in caught.value.message
    provider.close()


def test_the_seeds_camel_case_config_works_with_cache_timeout_in_milliseconds(
    tmp_path: Path, ticker: Ticker
) -> None:
    path = write_json(tmp_path / "flow.json", linear("f", ttl=10))
    provider = make_flow_provider(
        {"source": "file", "filePath": str(path), "cacheTimeout": 30_000, "clock": ticker}
    )
    assert provider.get_flow("f").ttl == 10
    write_json(path, linear("f", ttl=20))
    ticker.advance(29)
    assert provider.get_flow("f").ttl == 10  # 30,000 ms: still fresh after 29 s
    ticker.advance(2)
    assert provider.get_flow("f").ttl == 20
    config = config_from_seed(
        {
            "source": "hybrid",
            "sources": [
                {"source": "file", "filePath": str(path)},
                {
                    "source": "remote",
                    "remoteUrl": "https://cfg.example/flows",
                    "authentication": {"type": "bearer", "credentials": "t"},
                    "cacheTimeout": 300000,
                },
            ],
        }
    )
    assert config.sources[1].cache_timeout == 300
    assert config.sources[1].authentication == Authentication("bearer", "t")
    assert config.sources[0].file_path == str(path)


@pytest.mark.parametrize(
    "config",
    [
        {"source": "file", "file_path": "x"},  # snake_case is ours, not the seed's
        {"filePath": "x"},
        {"source": "file", "filePath": "x", "cacheTimeout": "300000"},
        {"source": "remote", "remoteUrl": "u", "authentication": {"kind": "bearer"}},
        ["source", "file"],
    ],
)
def test_bad_seed_configs_are_invalid_arguments(config: Any) -> None:
    with pytest.raises(InvalidArgumentError):
        make_flow_provider(config)


def test_configuration_errors_are_invalid_arguments() -> None:
    for config in (
        FlowProviderConfig(source="file"),
        FlowProviderConfig(source="remote"),
        FlowProviderConfig(source="database"),
        FlowProviderConfig(source="hybrid"),
        FlowProviderConfig(source="nosuch"),  # type: ignore[arg-type]
        FlowProviderConfig(source="file", file_path="x", cache_timeout=-1),
    ):
        with pytest.raises(InvalidArgumentError):
            make_flow_provider(config)


# Loading definitions into the store: versions


def test_load_creates_versions_and_leaves_identical_flows_alone(
    store_url: str, tmp_path: Path
) -> None:
    write_json(tmp_path / "a.json", onboarding())
    write_json(tmp_path / "b.json", linear("b", ttl=30))
    with FlowStore(store_url) as store:
        first = load_flows(store, read_definitions(tmp_path))
        assert [(x.flow, x.action, x.version) for x in first] == [
            (FLOW, "created", 1),
            ("b", "created", 1),
        ]
        again = load_flows(store, read_definitions(tmp_path))
        assert [x.action for x in again] == ["unchanged", "unchanged"]
        write_json(tmp_path / "b.json", linear("b"))  # ttl removed
        changed = load_flows(store, read_definitions(tmp_path))
        assert [(x.flow, x.action, x.version) for x in changed] == [
            (FLOW, "unchanged", 1),
            ("b", "updated", 2),
        ]
        assert store.get_flow("b").ttl is None
        assert store.get_flow("b", 1).ttl == 30
        store.delete_flow("b")
        assert load_flows(store, read_definitions(tmp_path / "b.json"))[0].action == "created"
        assert store.get_flow("b").version == 3


def test_cli_load_shows_warnings_and_loads_the_flow(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path}/cli.db"
    looping = linear("sub")
    looping["steps"]["s2"]["transitions"] = {"renew": {"transition": "renew", "step": "s1"}}
    looping["steps"]["orphan"] = {"index": 9, "step": "orphan", "service": "s"}
    path = write_json(tmp_path / "sub.json", looping)
    assert main(["--url", url, "flows", "load", str(path)]) == 0
    out = capsys.readouterr().out
    assert "created sub (version 1)" in out
    assert "warning: flow sub: step 'orphan' is not reachable from initialStep 's0'" in out
    assert "warning: flow sub: no terminal step" in out
    assert main(["--url", url, "--json", "flows", "load", str(path)]) == 0
    assert orjson.loads(capsys.readouterr().out)["warnings"] == [
        {"flow": "sub", "warning": "step 'orphan' is not reachable from initialStep 's0'"},
        {
            "flow": "sub",
            "warning": "no terminal step (one without transitions) is reachable from 's0'",
        },
    ]


def test_cli_load_and_export_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path}/cli.db"
    folder = tmp_path / "flows"
    folder.mkdir()
    (folder / "onboarding.yaml").write_text(yaml.safe_dump(onboarding()), encoding="utf-8")
    assert main(["--url", url, "flows", "load", str(folder)]) == 0
    assert f"created {FLOW} (version 1)" in capsys.readouterr().out
    assert main(["--url", url, "flows", "export", FLOW]) == 0
    exported = capsys.readouterr().out
    assert orjson.loads(exported) == onboarding()
    (folder / "onboarding.yaml").unlink()
    (folder / "onboarding.json").write_text(exported, encoding="utf-8")
    assert main(["--url", url, "--json", "flows", "load", str(folder)]) == 0
    assert orjson.loads(capsys.readouterr().out) == {
        "flows": [{"flow": FLOW, "action": "unchanged", "version": 1}],
        "warnings": [],
    }
    assert main(["--url", url, "flows", "load", str(tmp_path / "missing")]) == 5
    assert "missing" in capsys.readouterr().err
    write_json(folder / "bad.json", {"flow": "bad"})
    assert main(["--url", url, "flows", "load", str(folder)]) == 5
    assert "bad.json" in capsys.readouterr().err
    assert main(["--url", url, "flows", "export", "nope"]) == 3


def test_a_same_origin_redirect_is_followed_with_the_credentials(
    server: FlowServer, ticker: Ticker
) -> None:
    server.routes["/old"] = Answer(302, b"", location="/flows")
    server.serve("/flows", [linear("alpha")])
    server.required = {"X-API-Key": "k3y"}
    provider = make_flow_provider(
        remote(server.url("/old"), ticker, authentication=Authentication("apikey", "k3y"))
    )
    assert provider.get_flow("alpha").flow == "alpha"
    assert [path for path, _ in server.requests] == ["/old", "/flows"]


@pytest.mark.parametrize(
    "authentication",
    [
        Authentication("apikey", "k3y"),
        Authentication("apikey", "k3y", header="X-Flows-Key"),
        Authentication("bearer", "t0ken"),
        Authentication("basic", "ann:s3cret"),
    ],
    ids=["apikey", "custom-header", "bearer", "basic"],
)
def test_credentials_never_follow_a_redirect_to_another_origin(
    server: FlowServer, ticker: Ticker, authentication: Authentication
) -> None:
    # 127.0.0.1 and localhost are different origins (same server here, so the test can see both).
    elsewhere = f"http://localhost:{server.port}/stolen"
    server.routes["/flows"] = Answer(302, b"", location=elsewhere)
    server.serve("/stolen", [linear("alpha")])
    provider = make_flow_provider(
        remote(server.url("/flows"), ticker, authentication=authentication)
    )
    with pytest.raises(FlowNotFoundError, match="redirected to another origin"):
        provider.get_flow("alpha")
    assert [path for path, _ in server.requests] == ["/flows"]


@pytest.mark.parametrize("flow_id", [".", ".."])
def test_dot_flow_ids_cannot_escape_a_per_flow_url(
    server: FlowServer, ticker: Ticker, flow_id: str
) -> None:
    server.serve("/", [linear("alpha")])
    provider = make_flow_provider(remote(server.url("/flows/{flow_id}"), ticker))
    with pytest.raises(InvalidArgumentError, match="flow_id"):
        provider.get_flow(flow_id)
    assert server.requests == []


def test_a_yaml_alias_bomb_is_refused_before_it_expands(tmp_path: Path) -> None:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert path.stat().st_size < 1024  # 9**10 strings once expanded
    with pytest.raises(DefinitionError, match="aliases"):
        read_definitions(path)
