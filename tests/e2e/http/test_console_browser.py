"""The web console in a real browser: Debian's chromium, driven by Playwright, against a real server.

The server runs on 127.0.0.1 over a SQLite file that other processes (and stores) also write to, so
the console is seen picking up changes it did not make. Screenshots go to `test-artifacts/console/`
(or `$FLOWSTORE_TEST_ARTIFACTS/console/`): one per page checked, and one at the end of every test.

Chromium comes from Debian (`make chromium`); Playwright only drives it (`executable_path`), it never
downloads a browser.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from flowstore import FlowStore, InvalidTransitionError
from flowstore.adapters.http import JwtVerifier, create_app
from flowstore.adapters.http.console.render import HEAT, duration, percent
from tests.e2e.http.conftest import ONBOARDING, SECRET, LiveServer, bearer, mint
from tests.flows import linear, onboarding

CHROMIUM = os.environ.get("FLOWSTORE_CHROMIUM", "/usr/bin/chromium")
# Without the background-networking flags Chromium keeps trying to reach Google's hosts, which
# this sandbox's closed network refuses.
CHROMIUM_ARGS = [
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = (
    Path(os.environ.get("FLOWSTORE_TEST_ARTIFACTS") or Path(__file__).parents[3] / "test-artifacts")
    / "console"
)
ADMIN = mint("console-admin", roles=["admin"], ttl=3600)
CHECKOUT = "checkout"

expect.set_options(timeout=15_000)


def shot(page: Page, name: str) -> Path:
    """Save a full-page screenshot as a test artefact."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


@pytest.fixture(scope="module")
def db_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The SQLite file the server, the test and other processes share."""
    return f"sqlite:///{tmp_path_factory.mktemp('console') / 'flowstore.db'}"


@pytest.fixture(scope="module")
def console_store(db_url: str) -> Iterator[FlowStore]:
    """The server's store: onboarding (two versions) and checkout, with users part-way through."""
    with FlowStore(db_url) as store:
        store.create_flow(onboarding())
        store.update_flow(ONBOARDING, {"config": {"theme": "dark"}})  # version 2
        store.create_flow(linear(CHECKOUT, 3))
        for i in range(24):
            user = f"user-{i}"
            store.execute_transition(user, ONBOARDING, "start")
            if i % 2:
                store.execute_transition(user, ONBOARDING, "continue")
            elif i % 3 == 0:
                store.execute_transition(user, ONBOARDING, "skip")
            if i % 5 == 0:
                with pytest.raises(InvalidTransitionError):
                    store.execute_transition(user, ONBOARDING, "teleport")
            if i % 8 == 0 and i % 3 == 0:
                store.execute_transition(user, ONBOARDING, "complete")
        store.execute_transition("carol", ONBOARDING, "start")
        yield store


@pytest.fixture(scope="module")
def console_server(console_store: FlowStore) -> Iterator[LiveServer]:
    """`create_app` over the store on 127.0.0.1, as `flowstore serve` runs it."""
    app = create_app(console_store, JwtVerifier(SECRET), poll_interval=0.05)
    with LiveServer(app) as live:
        yield live


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
def page(
    browser: Browser, console_server: LiveServer, request: pytest.FixtureRequest
) -> Iterator[Page]:
    """A fresh browser context (no cookies) on the console's server; screenshotted at the end."""
    context = browser.new_context(
        base_url=console_server.url, viewport={"width": 1280, "height": 900}
    )
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        yield page
        assert not errors, f"script errors on the page: {errors}"
    finally:
        shot(page, f"{request.node.name}-end")
        context.close()


@pytest.fixture
def api(console_server: LiveServer) -> Iterator[httpx.Client]:
    """The REST API, as an admin."""
    with httpx.Client(base_url=console_server.url, headers=bearer(ADMIN), timeout=10) as client:
        yield client


def sign_in(page: Page) -> None:
    """Sign in the quick way: `/ui?token=` once."""
    page.goto(f"/ui?token={ADMIN}")
    expect(page).to_have_url(re.compile(r"/ui/flows$"))


def test_signing_in_with_the_form_keeps_the_token_in_an_httponly_cookie(page: Page) -> None:
    page.goto("/ui/operations")
    expect(page).to_have_url(re.compile(r"/ui/login\?next=%2Fui%2Foperations$"))
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    page.get_by_label("Bearer token").fill(ADMIN)
    shot(page, "sign-in")
    page.get_by_label("Bearer token").press("Enter")
    expect(page).to_have_url(re.compile(r"/ui/operations$"))
    expect(page.get_by_text("Signed in as console-admin")).to_be_visible()

    session = next(c for c in page.context.cookies() if c["name"] == "flowstore_console")
    assert session["httpOnly"] is True
    assert session["sameSite"] == "Strict"
    assert session["path"] == "/ui"
    assert "flowstore_console=" not in page.evaluate("document.cookie")

    page.get_by_role("link", name="Flows", exact=True).click()
    expect(page.get_by_role("row", name=re.compile(ONBOARDING))).to_be_visible()
    expect(page.get_by_role("row", name=re.compile(CHECKOUT))).to_be_visible()
    shot(page, "flows")

    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_text("You have signed out.")).to_be_visible()
    page.goto("/ui/flows")
    expect(page).to_have_url(re.compile(r"/ui/login"))


def test_links_from_another_site_reach_the_console_despite_the_strict_cookie(
    page: Page, console_server: LiveServer
) -> None:
    # A SameSite=Strict cookie is withheld from a navigation another site starts; the console
    # goes on from a page of its own so that the cookie is set (?token=) or sent (a page link).
    links = f"""<a href="{console_server.url}/ui?token={ADMIN}">sign in</a>
        <a href="{console_server.url}/ui/operations">operations</a>"""
    page.route(
        "http://portal.test/", lambda route: route.fulfill(body=links, content_type="text/html")
    )
    page.goto("http://portal.test/")
    page.get_by_role("link", name="sign in").click()
    expect(page).to_have_url(re.compile(r"/ui/flows$"))
    expect(page.get_by_text("Signed in as console-admin")).to_be_visible()
    page.goto("http://portal.test/")
    page.get_by_role("link", name="operations").click()
    expect(page).to_have_url(re.compile(r"/ui/operations$"))
    expect(page.get_by_role("heading", name="Operations", exact=True)).to_be_visible()


def test_a_flows_diagram_shows_the_users_on_each_step_and_the_transitions_taken(
    page: Page, api: httpx.Client
) -> None:
    if shutil.which("dot") is None:  # the console shows Mermaid text then: no SVG to inspect
        pytest.skip("no Graphviz `dot`: run `make graphviz` (apt-get install graphviz)")
    sign_in(page)
    page.get_by_role("link", name=ONBOARDING, exact=True).click()
    expect(page.get_by_role("heading", level=1)).to_contain_text("version 2 (latest)")
    diagram = page.get_by_role("img", name=re.compile(f"^State diagram of {ONBOARDING}"))
    expect(diagram).to_be_visible()

    funnel = {step["step"]: step for step in api.get(f"/api/flows/{ONBOARDING}/funnel").json()}
    nodes: list[list[Any]] = page.eval_on_selector_all(
        "#diagram g.node",
        """nodes => nodes.map(n => [
            n.querySelector("title").textContent,
            Array.from(n.querySelectorAll("text")).map(t => t.textContent),
            n.querySelector("rect:last-of-type").getAttribute("fill"),
        ])""",
    )
    labels = {title: texts for title, texts, _ in nodes}
    fills = {title: fill for title, _, fill in nodes}
    for step, figures in funnel.items():
        assert labels[step] == [step, f"{figures['current']} now"]
    busiest = max(funnel.values(), key=lambda step: step["current"])
    assert fills[busiest["step"]] == HEAT[-1]
    idle = [step for step, figures in funnel.items() if figures["current"] == 0]
    assert all(fills[step] == HEAT[0] for step in idle)

    edges: list[list[str]] = page.eval_on_selector_all(
        "#diagram g.edge",
        "edges => edges.map(e => Array.from(e.querySelectorAll('text')).map(t => t.textContent))",
    )
    started = funnel["welcome"]["movedOn"]  # welcome has one way out
    assert ["start", f"{started} took it, 0% drop-off"] in edges

    for step, figures in funnel.items():
        row = page.get_by_role("row", name=re.compile(f"^{step}"))
        expect(row.locator("[data-current]")).to_have_text(str(figures["current"]))
    shot(page, "flow-diagram")

    page.get_by_role("link", name="v1", exact=True).click()
    expect(page.get_by_role("heading", level=1)).to_contain_text("version 1")
    expect(page.get_by_role("heading", level=1)).not_to_contain_text("latest")
    expect(diagram).to_be_visible()


def test_the_funnel_shows_the_numbers_of_the_statistics_api(page: Page, api: httpx.Client) -> None:
    sign_in(page)
    page.goto(f"/ui/flows/{ONBOARDING}")
    page.get_by_role("link", name="Funnel and statistics").click()
    expect(page.get_by_role("heading", name=f"Funnel of {ONBOARDING}")).to_be_visible()

    stats = api.get(f"/api/flows/{ONBOARDING}/statistics").json()
    perf = stats["performanceMetrics"]
    shown = {
        "total_flows": (stats["totalFlows"], str(stats["totalFlows"])),
        "active_users": (stats["activeUsers"], str(stats["activeUsers"])),
        "completion_rate": (stats["completionRate"], percent(stats["completionRate"])),
        "average_flow_duration": (
            stats["averageFlowDuration"],
            duration(stats["averageFlowDuration"]),
        ),
        "error_rate": (stats["errorRate"], percent(stats["errorRate"])),
        "average_response_time": (
            perf["averageResponseTime"],
            duration(perf["averageResponseTime"]),
        ),
        "p95_response_time": (perf["p95ResponseTime"], duration(perf["p95ResponseTime"])),
    }
    for name, (value, text) in shown.items():
        cell = page.locator(f'dd[data-stat="{name}"]')
        expect(cell).to_have_text(text)
        assert float(cell.get_attribute("data-value") or "nan") == pytest.approx(value), name
    assert 0 < stats["completionRate"] < 1  # figures worth comparing
    assert stats["errorRate"] > 0

    funnel = api.get(f"/api/flows/{ONBOARDING}/funnel").json()
    rows = page.locator("#funnel tbody tr")
    expect(rows).to_have_count(len(funnel))
    for row, step in zip(rows.all(), funnel, strict=True):
        expect(row.get_by_role("rowheader")).to_have_text(step["step"])
        for field, key in (("entered", "entered"), ("moved_on", "movedOn"), ("dropped", "dropped")):
            expect(row.locator(f'[data-count="{field}"]')).to_have_text(str(step[key]))
        expect(row.locator('[data-count="current"]')).to_have_text(str(step["current"]))
    shot(page, "funnel-all-time")

    # Everything happened within the last day: that window agrees with all time. Keyboard only.
    page.get_by_role("link", name="Last 24 hours").focus()
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(r"window=24h$"))
    expect(page.get_by_role("link", name="Last 24 hours")).to_have_attribute("aria-current", "page")
    for name, (_, text) in shown.items():
        expect(page.locator(f'dd[data-stat="{name}"]')).to_have_text(text)
    for row, step in zip(page.locator("#funnel tbody tr").all(), funnel, strict=True):
        expect(row.locator('[data-count="entered"]')).to_have_text(str(step["entered"]))
    shot(page, "funnel-24h")


def test_a_users_timeline_follows_transitions_made_by_another_process(
    page: Page, db_url: str
) -> None:
    sign_in(page)
    page.get_by_role("link", name="Users").click()
    page.get_by_label("User id").fill("carol")
    page.get_by_label("User id").press("Enter")
    card = page.locator(f'section.card[data-flow="{ONBOARDING}"]')
    timeline = card.get_by_role("list", name=re.compile("^History of"))
    expect(timeline.get_by_role("listitem")).to_have_count(2)  # started, then "start"
    expect(page.locator("#journeys")).to_have_attribute("data-live", "on")  # socket open
    expect(page.locator(f'section.card[data-flow="{CHECKOUT}"]')).to_have_count(0)
    shot(page, "user-before")

    other_process = textwrap.dedent(
        """
        import sys
        from flowstore import FlowStore, InvalidTransitionError
        with FlowStore(sys.argv[1]) as store:
            store.execute_transition("carol", "user-onboarding", "continue")
            try:
                store.execute_transition("carol", "user-onboarding", "fly")
            except InvalidTransitionError:
                pass
            store.execute_transition("carol", "checkout", "next")
        """
    )
    subprocess.run([sys.executable, "-c", other_process, db_url], check=True, timeout=60)

    # No reload: the page heard it over the WebSocket and fetched the cards again.
    items = timeline.get_by_role("listitem")
    expect(items).to_have_count(4)
    expect(items.nth(0)).to_have_attribute("data-success", "false")
    expect(items.nth(0)).to_contain_text("fly at preferences")
    expect(items.nth(1)).to_have_attribute("data-transition", "continue")
    expect(items.nth(1)).to_contain_text("profile-setup → preferences")
    expect(card.locator("[data-state-step]")).to_have_attribute("data-state-step", "preferences")
    checkout = page.locator(f'section.card[data-flow="{CHECKOUT}"]')
    expect(checkout.get_by_role("listitem")).to_have_count(2)
    expect(page.get_by_role("status").filter(has_text="Live.")).to_be_visible()
    shot(page, "user-timeline-live")


def test_operations_report_positions_and_run_with_results(
    page: Page, db_url: str, console_store: FlowStore
) -> None:
    # An instance idle since two hours ago on a flow with a one-minute ttl: purge will expire it.
    two_hours_ago = datetime.now(UTC) - timedelta(hours=2)
    with FlowStore(db_url, clock=lambda: two_hours_ago) as past:
        past.create_flow(linear("short-lived", 3, ttl=60))
        past.execute_transition("idle-dan", "short-lived", "next")
    head = console_store.log_position()

    sign_in(page)
    page.get_by_role("link", name="Operations").click()
    expect(page.locator('[data-position="log"]')).to_have_text(str(head))
    expect(page.locator('[data-position="lag"]')).to_have_text("0 events")

    page.get_by_role("button", name="Verify projections").click()
    expect(page.locator("#output-verify")).to_have_text("The projections agree with the log.")
    page.get_by_role("button", name="Purge expired flows").click()
    expect(page.locator("#output-purge")).to_have_text("Expired 1 idle flow.")
    expect(page.locator('[data-position="log"]')).to_have_text(str(head + 1))
    page.get_by_role("button", name="Rebuild projections").click()
    expect(page.locator("#output-rebuild")).to_have_text(
        f"Rebuilt the projections from {head + 1} events."
    )
    expect(page.get_by_role("button", name="Rebuild projections")).to_be_enabled()
    expect(page.locator("#jobs > li")).to_have_count(3)
    expect(page.locator('#jobs > li[data-state="succeeded"]')).to_have_count(3)
    expect(page.locator('[data-position="projection"]')).to_have_text(str(head + 1))
    shot(page, "operations")
    assert console_store.get_flow_state("idle-dan", "short-lived") is None


def test_the_console_can_be_used_with_the_keyboard(page: Page) -> None:
    sign_in(page)
    page.goto("/ui/users")
    page.keyboard.press("Tab")
    expect(page.get_by_role("link", name="Skip to content")).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.locator("main")).to_be_focused()
    page.keyboard.press("Tab")
    expect(page.get_by_label("User id")).to_be_focused()
    page.keyboard.type("user-1")
    page.keyboard.press("Enter")
    expect(page.locator('section.card[data-flow="user-onboarding"]')).to_be_visible()
    expect(page.get_by_role("link", name="Users")).to_have_attribute("aria-current", "page")
    unlabelled = page.evaluate(
        """() => Array.from(document.querySelectorAll("input, select, textarea, button"))
            .filter(e => e.type !== "hidden" && !(e.labels && e.labels.length) && !e.textContent.trim()
                         && !e.getAttribute("aria-label"))
            .map(e => e.outerHTML)"""
    )
    assert unlabelled == []
