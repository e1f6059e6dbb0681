"""The commands that run until stopped: `serve`, `worker`, `follow`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flowstore.adapters.cli.output import Note, Output, Result

if TYPE_CHECKING:
    import threading

    from flowstore import FlowStore

__all__ = ["follow", "serve", "stop_on_signals", "worker"]


def stop_on_signals() -> threading.Event:
    """An event that SIGTERM or SIGINT sets: a command that runs until stopped waits on it."""
    import signal
    import threading

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    return stop


def worker(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`worker`: projections, expiry and the Kafka publisher, each led by one worker of a fleet."""
    from flowstore.adapters.worker import WorkerSettings, run_worker

    stop = stop_on_signals()
    bootstrap = args.bootstrap or os.environ.get("FLOWSTORE_KAFKA_BOOTSTRAP", "")
    settings = WorkerSettings(
        interval=args.interval,
        batch=args.batch,
        expire_every=args.expire_every,
        bootstrap=bootstrap,
        topic=args.topic,
    )
    on_change: Callable[[str, bool], None] | None = None
    if args.metrics_port:
        try:
            from prometheus_client import start_http_server

            from flowstore.adapters.metrics import FleetMetrics
        except ImportError as exc:
            hint = "--metrics-port needs the metrics extra: pip install 'flowstore-es[metrics]'"
            raise SystemExit(f"{hint} ({exc})") from None
        metrics = FleetMetrics(store)
        start_http_server(args.metrics_port, addr=args.metrics_host, registry=metrics.registry)

        def on_change(job: str, leading: bool) -> None:
            metrics.leader.labels(job).set(1 if leading else 0)

    # Commands, expiry and rebuilds are counted by the store itself (FleetMetrics observes it).
    trace_if_asked(store)
    run_worker(store, stop, settings, on_change=on_change)
    position = store.projection_position()
    return Note(f"stopped; tables at event {position}", {"position": position})


def _handler(spec: str) -> Any:
    """The function `module:function` names, imported (from the working directory too)."""
    import importlib

    from flowstore.errors import InvalidArgumentError

    module_name, _, attribute = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as uvicorn does: the app's own modules
    try:
        handler = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise InvalidArgumentError("--handler", spec, f"cannot be imported ({exc})") from None
    if not callable(handler):
        raise InvalidArgumentError("--handler", spec, "is not callable")
    return handler


def follow(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`follow NAME --handler module:function`: a durable follower, until SIGTERM/SIGINT."""
    import asyncio
    import inspect
    import signal

    handler = _handler(args.handler)
    loop: asyncio.AbstractEventLoop | None = None
    if inspect.iscoroutinefunction(handler):
        # An `async def` handler runs to completion inside the event's transaction, on a loop
        # of this worker's own.
        loop, coroutine_handler = asyncio.new_event_loop(), handler

        def handler(event: Any, connection: Any) -> object:
            assert loop is not None
            return loop.run_until_complete(coroutine_handler(event, connection))

    follower = store.follow(args.name, handler, interval=args.interval, start=False)
    try:
        if args.once:
            applied = follower.catch_up()
        else:
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, lambda *_: follower.halt())
            out.console.print(
                f"following the log as {args.name!r} (standby while another process does); "
                "stop with Ctrl-C or SIGTERM"
            )
            follower.run()
            applied = None
        position = follower.position()
    finally:
        follower.stop()
        if loop is not None:
            loop.close()
    details: dict[str, Any] = {"name": args.name, "position": position}
    if applied is not None:
        details["applied"] = applied
    return Note(f"{args.name} stopped at event {position}", details)


def trace_if_asked(store: FlowStore) -> None:
    """Trace the store's work with OpenTelemetry when `$FLOWSTORE_TRACING` is 1 (`otel` extra)."""
    if os.environ.get("FLOWSTORE_TRACING", "").strip() != "1":
        return
    try:
        from flowstore.adapters.tracing import trace_store
    except ImportError as exc:
        hint = "FLOWSTORE_TRACING=1 needs the otel extra: pip install 'flowstore-es[otel]'"
        raise SystemExit(f"{hint} ({exc})") from None
    trace_store(store)


def serve(store: FlowStore, args: argparse.Namespace, out: Output) -> Result:
    """`serve [--host H] [--port P] [--projector live|off]`: the HTTP and WebSocket API."""
    try:
        # Imported here, not at the top: the rest of the CLI works without the `http` extra.
        from flowstore.adapters.http import serve as serve_http
    except ImportError as exc:
        hint = "flowstore serve needs the http extra: pip install 'flowstore-es[http]'"
        raise SystemExit(f"{hint} ({exc})") from None
    trace_if_asked(store)
    serve_http(store, host=args.host, port=args.port, log_level=args.log_level)
    return None
