"""`flowstore worker`: the store's singleton jobs, each run by one elected process of a fleet.

Three jobs, each in its own thread and each under its own `flowstore.leader.LeaderLock`, so that
any number of workers can run (one leads each job, the others stand by and take over within
about a second of the leader dying):

- `projections`: catch the read-model tables up with the log, every `interval` seconds;
- `expiry`: expire the instances idle past their flow's ttl, every `expire_every` seconds;
- the Kafka publisher, when a bootstrap is configured (its own lock per topic, see
  `flowstore.adapters.kafka.tracking.PublisherLock`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from flowstore import FlowStore
from flowstore.leader import LeaderLock, run_elected

__all__ = ["WorkerSettings", "run_worker"]

log = logging.getLogger(__name__)

_SIGNAL_CHECK = 0.25
"""Seconds at most between two looks at pending signals by the thread waiting for the stop."""


@dataclass(frozen=True)
class WorkerSettings:
    """How often each job runs, and where to publish (no bootstrap: no publisher)."""

    interval: float = 0.5
    """Seconds between two projection catch-ups."""
    batch: int = 1000
    """Events per projection transaction."""
    expire_every: float = 60.0
    """Seconds between two expiry rounds (0 turns expiry off)."""
    bootstrap: str = ""
    topic: str | None = None
    jobs: tuple[str, ...] = field(default=("projections", "expiry", "publisher"))


def run_worker(
    store: FlowStore,
    stop: threading.Event,
    settings: WorkerSettings,
    *,
    on_change: Callable[[str, bool], None] | None = None,
    on_expired: Callable[[int], None] | None = None,
) -> None:
    """Run the jobs until `stop` is set; `on_change(job, leading)` hears every change of leader,
    `on_expired(n)` every expiry round that expired something."""

    def told(job: str) -> Callable[[bool], None]:
        def change(leading: bool) -> None:
            if on_change:
                on_change(job, leading)

        return change

    key = str(id(store))
    threads: list[threading.Thread] = []

    def start(name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=f"flowstore-{name}", daemon=True)
        thread.start()
        threads.append(thread)

    if "projections" in settings.jobs:
        lock = LeaderLock(store.config, "projections", store_key=key)
        notifier = store.log_notifier
        seen = [0]

        def catch_up() -> None:
            seen[0] = notifier.generation  # before reading: no append goes unnoticed
            store.catch_up_projections(settings.batch, stop=stop)

        def pause(interval: float) -> None:
            # PostgreSQL: wake on the next append or the stop, poll as a fallback.
            if notifier.pushes:
                notifier.wait(seen[0], interval, stop=stop)
            else:
                stop.wait(interval)

        start(
            "projections",
            lambda: run_elected(
                lock,
                catch_up,
                stop,
                interval=settings.interval,
                on_change=told("projections"),
                pause=pause,
            ),
        )
    if "expiry" in settings.jobs and settings.expire_every > 0:
        expiry = LeaderLock(store.config, "expiry", store_key=key)

        def expire() -> None:
            purged = store.purge_expired_flows()
            if purged:
                log.info("expired %d flow instance(s)", purged)
                if on_expired:
                    on_expired(purged)

        start(
            "expiry",
            lambda: run_elected(
                expiry, expire, stop, interval=settings.expire_every, on_change=told("expiry")
            ),
        )
    if "publisher" in settings.jobs and settings.bootstrap:
        # Imported here: the worker runs without the kafka extra when nothing is published.
        from flowstore.adapters.kafka.publisher import KafkaPublisher

        publisher = KafkaPublisher(store, settings.bootstrap, settings.topic)
        start("publisher", lambda: publisher.run(stop))
    # Not `stop.wait()`: Python runs a signal's handler (the CLI's sets `stop`) in the main thread
    # only, and Linux may hand a SIGTERM sent to the process to any thread that takes it first
    # (seen here: a job thread in the middle of starting a thread took it). Then the C
    # handler runs in that thread, and a main thread blocked without a timeout is never woken to
    # run the Python one: the worker ran on. A bounded wait comes back and runs it.
    while not stop.wait(_SIGNAL_CHECK):
        pass
    store.log_notifier.wake()  # the projections job may be waiting for an append, not the stop
    for thread in threads:
        # Bounded: a job stuck in a database call must not keep a stopping worker alive (its
        # locks die with the process anyway).
        thread.join(timeout=30)
        if thread.is_alive():
            log.warning("%s did not stop within 30 s; leaving it", thread.name)
