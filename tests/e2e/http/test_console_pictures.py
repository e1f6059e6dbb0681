"""The console's pictures in Debian's chromium: the flow diagram, activity charts, where users stick.

Two `flowstore serve` processes serve one SQLite file: one with Graphviz's `dot` on its PATH (a
wrapper that logs each call and runs the real one, if there is one), one with a PATH that holds
nothing. Every page is checked on both, against the flow definitions and against figures this
test computes itself from the users' histories; the diagram must be the same picture on both,
and the console must never have called `dot`. Screenshots go to `test-artifacts/console/`.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from flowstore import FlowDefinition, FlowStore, InvalidTransitionError
from flowstore.adapters.http.console.render import HEAT, duration
from flowstore.projections.ops import bin_value, response_bin
from tests.e2e.http.conftest import ONBOARDING, SECRET, mint, wait_until_healthy
from tests.e2e.http.test_console_browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS
from tests.e2e.http.test_serve import free_port
from tests.flows import onboarding

ADMIN = mint("console-admin", roles=["admin"], ttl=3600)
LOOPS = "loops"
ODD = '<b>"odd" & step</b>'
"""A step name that is markup, quotes and an ampersand: it must show as text."""

expect.set_options(timeout=15_000)


def loops() -> dict[str, Any]:
    """A flow with a way back (review -> edit), a loop on one step, and a name full of markup."""

    def step(index: int, name: str, **transitions: str) -> dict[str, Any]:
        moves = {t: {"transition": t, "step": to} for t, to in transitions.items()}
        return {"index": index, "step": name, "service": "svc", "transitions": moves}

    return {
        "flow": LOOPS,
        "initialStep": "edit",
        "steps": {
            "edit": step(0, "edit", submit="review", again="edit"),
            "review": step(1, "review", reject="edit", accept=ODD),
            ODD: step(2, ODD, publish="done"),
            "done": step(3, "done"),
        },
    }


@pytest.fixture(scope="module")
def db_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store whose users acted over the last 45 minutes, some of them idle since."""
    path = tmp_path_factory.mktemp("pictures") / "flowstore.db"
    start = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=45)
    clock = [start]
    with FlowStore(f"sqlite:///{path}", clock=lambda: clock[0]) as store:
        store.create_flow(onboarding())
        store.create_flow(loops())
        for i in range(30):
            clock[0] = start + timedelta(seconds=80 * i)
            user = f"user-{i:02}"
            store.execute_transition(user, ONBOARDING, "start")
            clock[0] += timedelta(seconds=20 + 7 * (i % 5))
            if i % 3:
                # Some steps report failure (ok=False): the charts count them as errors.
                move = "continue" if i % 2 else "skip"
                store.execute_transition(user, ONBOARDING, move, ok=i % 5 != 1)
            if i % 4 == 0:
                with pytest.raises(InvalidTransitionError):
                    store.execute_transition(user, ONBOARDING, "teleport")
            clock[0] += timedelta(seconds=30)
            if i % 3 == 2 and i % 2 == 0:  # skipped to verification: some complete
                store.execute_transition(user, ONBOARDING, "complete")
            if i < 6:
                for move in ("again", "submit", "reject", "submit", "accept", "publish")[: i + 1]:
                    store.execute_transition(f"writer-{i}", LOOPS, move)
    return path


@dataclass
class Server:
    """One `flowstore serve` process over the shared file."""

    name: str
    url: str
    dot_log: Path | None


def _serve(db: Path, name: str, tmp: Path) -> Iterator[Server]:
    bin_dir = tmp / f"bin-{name}"
    bin_dir.mkdir()
    dot_log = None
    if name == "with-dot":
        # A `dot` that logs every call, then runs Graphviz if this machine has it.
        dot_log = tmp / "dot-calls.log"
        dot_log.touch()
        real = shutil.which("dot")
        wrapper = bin_dir / "dot"
        run = f'exec "{real}" "$@"' if real else "exit 3"
        wrapper.write_text(f'#!/bin/sh\necho "$@" >> "{dot_log}"\n{run}\n')
        wrapper.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWSTORE_")}
    env |= {"PATH": str(bin_dir), "FLOWSTORE_JWT_SECRET": SECRET}
    port = free_port()
    log = tmp / f"server-{name}.log"
    command = [sys.executable, "-m", "flowstore.adapters.cli", "--url", f"sqlite:///{db}"]
    with log.open("w") as out:
        process = subprocess.Popen(
            [*command, "serve", "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, alive=lambda: process.poll() is None, timeout=60)
        yield Server(name, url, dot_log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def with_dot(db_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The server with `dot` on its PATH."""
    yield from _serve(db_file, "with-dot", tmp_path_factory.mktemp("with-dot"))


@pytest.fixture(scope="module")
def without_dot(db_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The server with an empty PATH: no Graphviz."""
    yield from _serve(db_file, "without-dot", tmp_path_factory.mktemp("without-dot"))


@pytest.fixture(params=["with-dot", "without-dot"])
def server(request: pytest.FixtureRequest) -> Server:
    """Each test runs against both servers."""
    chosen: Server = request.getfixturevalue(request.param.replace("-", "_"))
    return chosen


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Headless Debian chromium."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no Chromium at {CHROMIUM}: run `make chromium` (apt-get install chromium)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Browser, server: Server) -> Iterator[Page]:
    """A signed-in page on `server`, failing the test on any script error."""
    context = browser.new_context(base_url=server.url, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"/ui?token={ADMIN}")
    expect(page).to_have_url(re.compile(r"/ui/flows$"))
    try:
        yield page
        assert not errors, f"script errors on the page: {errors}"
    finally:
        context.close()


def shot(page: Page, name: str, server: Server) -> None:
    """A full-page screenshot as a test artefact."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}-{server.name}.png"), full_page=True)


@pytest.fixture(scope="module")
def reader(db_file: Path) -> Iterator[FlowStore]:
    """The test's own store on the file, to compute expected figures."""
    with FlowStore(f"sqlite:///{db_file}") as store:
        yield store


def histories(store: FlowStore, flow_id: str, users: list[str]) -> dict[str, list[Any]]:
    """Every user's history in the flow."""
    return {user: store.get_flow_history(user, flow_id) for user in users}


def nearest_rank(values: list[float], q: float) -> float:
    """The nearest-rank percentile, as the console computes it."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


# The diagram


def test_the_diagram_draws_every_step_and_transition_of_the_definition(
    page: Page, server: Server, reader: FlowStore
) -> None:
    for flow_id in (ONBOARDING, LOOPS):
        page.goto(f"/ui/flows/{flow_id}")
        diagram = page.get_by_role("img", name=re.compile(f"^State diagram of {flow_id}"))
        expect(diagram).to_be_visible()
        definition: FlowDefinition = reader.get_flow(flow_id)
        funnel = {s.step: s for s in reader.get_flow_funnel(flow_id)}
        nodes = page.eval_on_selector_all(
            "#diagram g.node",
            """nodes => nodes.map(n => [n.dataset.step,
                Array.from(n.querySelectorAll("text")).map(t => t.textContent),
                n.querySelector("rect:last-of-type").getAttribute("fill"),
                n.classList.contains("terminal")])""",
        )
        assert sorted(n[0] for n in nodes) == sorted(definition.steps)
        most = max(s.current for s in funnel.values())
        for step, texts, fill, terminal in nodes:
            current = funnel[step].current
            assert texts == [step, f"{current} now"]
            assert terminal == definition.steps[step].is_terminal
            if current == most:
                assert fill == HEAT[-1]
            elif current == 0:
                assert fill == HEAT[0]
        edges = page.eval_on_selector_all(
            "#diagram g.edge",
            """edges => edges.map(e => [e.dataset.from, e.dataset.transition, e.dataset.to,
                Array.from(e.querySelectorAll("text")).map(t => t.textContent),
                e.classList.contains("back")])""",
        )
        expected = {
            (s.step, name, t.step)
            for s in definition.steps.values()
            for name, t in s.transitions.items()
        }
        assert {(a, t, b) for a, t, b, _, _ in edges} == expected
        assert len(edges) == len(expected)
        taken = reader.diagram(flow_id, "mermaid", stats=True)  # the store's own labels
        for source, name, _target, texts, _ in edges:
            assert texts[0] == name
            assert f"{name} ({texts[1]})" in taken.replace("#59;", ";").replace("#quot;", '"')
            del source
        backs = {(a, t) for a, t, _, _, back in edges if back}
        if flow_id == LOOPS:
            assert backs == {("edit", "again"), ("review", "reject")}
        else:
            assert backs == set()
        shot(page, f"diagram-{flow_id}", server)
    # The odd step name is text on the page, not markup.
    expect(page.locator("#diagram g.node", has_text='"odd" & step')).to_have_count(1)
    assert page.locator("#diagram b").count() == 0


def test_the_diagram_is_the_same_picture_with_and_without_dot(
    with_dot: Server, without_dot: Server
) -> None:
    pictures = []
    for server in (with_dot, without_dot):
        with httpx.Client(base_url=server.url, timeout=30) as client:
            client.get("/ui", params={"token": ADMIN})
            page = client.get(f"/ui/flows/{ONBOARDING}").text
        found = re.search(r"<svg .*?</svg>", page, re.S)
        assert found, f"no diagram on {server.name}"
        pictures.append(found.group(0))
    assert pictures[0] == pictures[1]
    assert with_dot.dot_log is not None
    assert with_dot.dot_log.read_text() == ""  # the console never ran Graphviz


# Activity over time


def test_the_activity_charts_plot_the_minutes_of_the_histories(
    page: Page, server: Server, reader: FlowStore
) -> None:
    page.goto(f"/ui/flows/{ONBOARDING}")
    page.get_by_role("link", name="Activity over time").click()
    expect(page.get_by_role("heading", name=f"Activity of {ONBOARDING}")).to_be_visible()
    expect(page.get_by_role("link", name="Last hour, per minute")).to_have_attribute(
        "aria-current", "page"
    )
    first = page.locator("table[data-table=counts] tbody th").first.text_content()
    assert first is not None

    # What the charts should show, from the users' histories, per minute.
    users = [f"user-{i:02}" for i in range(30)]
    per_minute: defaultdict[datetime, dict[str, Any]] = defaultdict(
        lambda: {"transitions": 0, "rejections": 0, "errors": 0, "completions": 0, "times": []}
    )
    terminal = {"completed"}
    for rows in histories(reader, ONBOARDING, users).values():
        for row in rows:
            minute = row.timestamp.replace(second=0, microsecond=0)
            if row.kind == "transition":
                per_minute[minute]["transitions" if row.success else "rejections"] += 1
                per_minute[minute]["errors"] += row.success and row.ok is False
                per_minute[minute]["times"].append(row.metadata["elapsed_ms"])
            if row.success and row.to_step in terminal:
                per_minute[minute]["completions"] += 1

    points = page.eval_on_selector_all(
        "svg.chart circle.point",
        "cs => cs.map(c => [c.dataset.series, c.dataset.at, Number(c.dataset.value)])",
    )
    starts = page.eval_on_selector_all(
        "table[data-table=counts] tbody th", "ths => ths.map(t => t.textContent)"
    )
    series: defaultdict[str, dict[datetime, float]] = defaultdict(dict)
    for name, at, value in points:
        series[name][datetime.fromisoformat(at)] = value
    assert set(series) == {
        "transitions",
        "rejections",
        "errors",
        "completions",
        "error_rate",
        "p50",
        "p95",
    }
    minutes = sorted(series["transitions"])
    assert len(minutes) == 60  # one point per minute, a minute apart
    assert all(b - a == timedelta(minutes=1) for a, b in itertools.pairwise(minutes))
    for name in ("transitions", "rejections", "errors", "completions"):
        assert sorted(series[name]) == minutes
    # Rates and response times only where there were attempts: elsewhere the line has a gap.
    tried = [m for m in minutes if per_minute.get(m, {}).get("times")]
    for name in ("error_rate", "p50", "p95"):
        assert sorted(series[name]) == tried
    empty = {"transitions": 0, "rejections": 0, "errors": 0, "completions": 0, "times": []}
    shown = 0
    for minute in minutes:
        want = per_minute.get(minute, empty)
        attempts = want["transitions"] + want["rejections"]
        assert series["transitions"][minute] == want["transitions"], minute
        assert series["rejections"][minute] == want["rejections"], minute
        assert series["completions"][minute] == want["completions"], minute
        assert series["errors"][minute] == want["errors"], minute
        if attempts:
            rate = (want["rejections"] + want["errors"]) / attempts
            assert series["error_rate"][minute] == pytest.approx(rate)
            # From the minute's histogram: the bin of the nearest-rank value (within 4.4% of it).
            for q in (50, 95):
                exact = nearest_rank(want["times"], q)
                assert series[f"p{q}"][minute] == pytest.approx(bin_value(response_bin(exact)))
        shown += attempts
    assert shown == sum(w["transitions"] + w["rejections"] for w in per_minute.values())
    assert len(starts) > 10
    totals = sum(w["transitions"] for w in per_minute.values())
    assert sum(w["errors"] for w in per_minute.values()) > 0  # the seed has failing steps
    expect(page.locator('dd[data-total="errors"]')).to_have_text(
        str(sum(w["errors"] for w in per_minute.values()))
    )
    expect(page.locator('dd[data-total="transitions"]')).to_have_text(str(totals))
    shot(page, "activity-1h", server)

    # Another window, by keyboard: the last 30 days per day has everything in one or two points.
    page.get_by_role("link", name="Last 30 days, per day").focus()
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(r"window=30d$"))
    days = page.eval_on_selector_all(
        'svg#chart-counts circle.point[data-series="transitions"]',
        "cs => cs.map(c => Number(c.dataset.value))",
    )
    assert len(days) == 30
    assert sum(days) == totals
    shot(page, "activity-30d", server)


def test_the_charts_are_there_without_javascript(browser: Browser, server: Server) -> None:
    context = browser.new_context(base_url=server.url, java_script_enabled=False)
    page = context.new_page()
    try:
        page.goto(f"/ui?token={ADMIN}")
        expect(page).to_have_url(re.compile(r"/ui/flows$"))  # the sign-in page moves on by itself
        page.goto(f"/ui/flows/{ONBOARDING}/activity?window=24h")
        expect(page.locator("svg#chart-counts circle.point")).to_have_count(4 * 24)
        expect(page.locator("svg#chart-times circle.point")).not_to_have_count(0)
        expect(page.get_by_role("img", name=re.compile("^Response time per hour"))).to_be_visible()
    finally:
        context.close()


# Where users get stuck


def test_the_stuck_page_shows_stays_idle_users_and_links_to_their_timelines(
    page: Page, server: Server, reader: FlowStore
) -> None:
    page.goto(f"/ui/flows/{ONBOARDING}")
    page.get_by_role("link", name="Where users get stuck").click()
    expect(
        page.get_by_role("heading", name=f"Where users get stuck in {ONBOARDING}")
    ).to_be_visible()
    page.get_by_role("link", name="5 minutes").click()
    expect(page).to_have_url(re.compile(r"idle=5m$"))

    # How long each run stayed on profile-setup before moving on, from the histories.
    users = [f"user-{i:02}" for i in range(30)]
    stays: defaultdict[str, list[float]] = defaultdict(list)
    for rows in histories(reader, ONBOARDING, users).values():
        accepted = [r for r in rows if r.success and r.to_step is not None]
        for before, after in itertools.pairwise(accepted):
            if after.kind == "transition" and after.from_step == before.to_step:
                stays[after.from_step].append(
                    round((after.timestamp - before.timestamp).total_seconds() * 1000)
                )
    row = page.locator('#stuck tr[data-step="profile-setup"]')
    expect(row.locator('[data-figure="moves"]')).to_have_text(str(len(stays["profile-setup"])))
    for q in (50, 95):
        cell = row.locator(f'[data-figure="p{q}"]')
        assert float(cell.get_attribute("data-value") or "nan") == nearest_rank(
            stays["profile-setup"], q
        )
        expect(cell).to_have_text(duration(nearest_rank(stays["profile-setup"], q)))
    bars = row.locator("svg.histogram rect.bin")
    assert sum(int(b.get_attribute("data-value") or 0) for b in bars.all()) == len(
        stays["profile-setup"]
    )

    # Who is idle there now (all of them acted at least ten minutes ago).
    idle = sorted(
        (state.updated_at, user)
        for user in users
        if (state := reader.get_flow_state(user, ONBOARDING)) is not None
        and state.step == "profile-setup"
        and state.status == "active"
    )
    assert idle, "the seed leaves users on profile-setup"
    expect(row.locator('[data-figure="active"]')).to_have_text(str(len(idle)))
    expect(row.locator('[data-figure="idle"]')).to_have_text(str(len(idle)))
    shot(page, "stuck", server)

    row.get_by_role("link", name=re.compile("idle on profile-setup")).click()
    listed = page.locator("#idle-users tbody tr")
    expect(listed).to_have_count(len(idle))
    assert [r.get_attribute("data-user") for r in listed.all()] == [user for _, user in idle]
    shot(page, "stuck-users", server)

    longest = idle[0][1]
    page.get_by_role("link", name=longest, exact=True).click()
    expect(page).to_have_url(re.compile(rf"/ui/users\?user={longest}$"))
    card = page.locator(f'section.card[data-flow="{ONBOARDING}"]')
    expect(card.get_by_role("list", name=re.compile("^History of"))).to_be_visible()


def test_an_unknown_idle_choice_or_cursor_is_refused(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        client.get("/ui", params={"token": ADMIN})
        base = f"/ui/flows/{ONBOARDING}"
        assert client.get(f"{base}/stuck", params={"idle": "1y"}).status_code == 422
        assert client.get(f"{base}/activity", params={"window": "1y"}).status_code == 422
        bad = client.get(f"{base}/stuck", params={"step": "welcome", "cursor": "!!"})
        assert bad.status_code == 422
        assert "not a cursor" in bad.text
        assert client.get("/ui/flows/nope/activity").status_code == 404


# The README's pictures


README_PAGES = [
    ("flows", "/ui/flows", "Flows"),
    ("flow", f"/ui/flows/{ONBOARDING}", ONBOARDING),
    ("funnel", f"/ui/flows/{ONBOARDING}/funnel", f"Funnel of {ONBOARDING}"),
    ("activity", f"/ui/flows/{ONBOARDING}/activity", f"Activity of {ONBOARDING}"),
    (
        "stuck",
        f"/ui/flows/{ONBOARDING}/stuck?idle=5m&step=profile-setup",
        f"Where users get stuck in {ONBOARDING}",
    ),
    ("users", "/ui/users?user=user-02", "Users"),
    ("operations", "/ui/operations", "Operations"),
]


def test_each_page_renders_for_the_readme(browser: Browser, without_dot: Server) -> None:
    # Small screenshots (0.6 device pixels per CSS pixel, the top 1,500 CSS pixels) for docs/console/.
    context = browser.new_context(
        base_url=without_dot.url, viewport={"width": 1200, "height": 900}, device_scale_factor=0.6
    )
    page = context.new_page()
    try:
        page.goto(f"/ui?token={ADMIN}")
        expect(page).to_have_url(re.compile(r"/ui/flows$"))
        folder = ARTIFACTS / "readme"
        folder.mkdir(parents=True, exist_ok=True)
        for name, path, heading in README_PAGES:
            page.goto(path)
            expect(page.get_by_role("heading", level=1)).to_contain_text(heading)
            height = min(1500, page.evaluate("document.documentElement.scrollHeight"))
            page.screenshot(
                path=str(folder / f"{name}.png"),
                full_page=True,
                clip={"x": 0, "y": 0, "width": 1200, "height": height},
            )
    finally:
        context.close()


def test_every_page_renders_with_and_without_dot(page: Page, server: Server) -> None:
    for name, path, heading in README_PAGES:
        page.goto(path)
        expect(page.get_by_role("heading", level=1)).to_contain_text(heading)
        expect(page.locator("main")).not_to_contain_text("Internal Server Error")
        shot(page, f"page-{name}", server)
    assert server.dot_log is None or server.dot_log.read_text() == ""
