"""A PostgreSQL leader's heartbeat renews its lease: an idle leader keeps its lock, lease after lease."""

from __future__ import annotations

import logging
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
