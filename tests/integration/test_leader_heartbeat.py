"""A PostgreSQL leader's heartbeat renews its lease: an idle leader keeps its lock, lease after lease."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from flowstore.leader import LeaderLock
from flowstore.storage import parse_url
from tests.pgserver import PostgresServer

pytestmark = pytest.mark.timeout(60)


def test_an_idle_leader_keeps_its_lock_over_several_leases(
    pg_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    config = parse_url(pg_server.create_database())
    # A lease of 3 s: the lock counts as lost once no ping was answered for three quarters of
    # one, and a heartbeat woken half a second late on a busy machine must not make it so.
    leader, standby = LeaderLock(config, "job", lease=3.0), LeaderLock(config, "job", lease=3.0)
    caplog.set_level(logging.WARNING, logger="flowstore.leader")
    try:
        assert leader.try_acquire()
        # Two leases go by with nothing but the heartbeat on the leader's connection: its first
        # ping goes out after a quarter lease, and the server ends a session idle for a whole
        # lease (which frees the lock). A standby keeps trying meanwhile, as `run_elected`'s does.
        ends = time.monotonic() + 2 * leader.lease
        while time.monotonic() < ends:
            assert leader.check()
            assert not standby.try_acquire()
            time.sleep(0.05)  # the standby's polling pace
        assert leader.check()
    finally:
        standby.release()
        leader.release()
    assert not [r.getMessage() for r in caplog.records if "lost the" in r.getMessage()]


class _LateWake:
    """A heartbeat's stop event that wakes it `late` seconds after its pace, once, then stops it
    (a busy process's heartbeat thread getting the CPU late)."""

    def __init__(self, late: float) -> None:
        self.late, self.waits = late, 0

    def wait(self, timeout: float) -> bool:
        self.waits += 1
        if self.waits > 1:
            return True
        threading.Event().wait(timeout + self.late)  # the late wake-up itself, not a sync
        return False

    def is_set(self) -> bool:
        return self.waits > 1


def test_a_heartbeat_woken_late_gives_its_ping_only_what_is_left_of_the_lease(
    pg_server: PostgresServer,
) -> None:
    """The lock counts as lost three quarters of a lease after the last answered ping was sent;
    a ping sent late must have an answer by then too (it had half a lease from its own sending,
    so a silent network made it say "lost" after a standby could already lead)."""
    leader = LeaderLock(parse_url(pg_server.create_database()), "job", lease=1.0)
    try:
        assert leader.try_acquire()
        leader._stop_heartbeat()  # this test runs the heartbeat itself
        confirmed, asked, query = leader._confirmed, [], leader._query

        def recording(sql: str, timeout: float) -> str | None:
            asked.append(timeout)
            return query(sql, timeout)

        leader._query = recording  # type: ignore[method-assign]
        leader._beat(_LateWake(late=0.3 * leader.lease))  # type: ignore[arg-type]
        # Sent at least 0.55 of a lease after the last answered ping: 0.2 of one left at most.
        assert len(asked) == 1
        assert asked[0] <= 0.2 * leader.lease
        assert leader._confirmed > confirmed  # answered in time: renewed
    finally:
        leader.release()
