"""The publisher's recorded position while the broker stalls: what the broker acknowledged is
recorded before a stall is reported, even when the send of the next page is what stalls."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kafka.errors import KafkaTimeoutError

from flowstore import FlowStore
from flowstore.adapters.kafka.publisher import KafkaPublisher, PublisherStatus, acknowledged_run
from tests.e2e.kafka.broker import TansuBroker
from tests.e2e.kafka.conftest import check_topic, wait_until
from tests.flows import linear


def test_a_page_the_broker_acknowledged_is_recorded_while_the_next_send_stalls(
    store_url: str, own_broker: TansuBroker, topic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pages of 5: page 2 is acknowledged, then the broker comes back empty, so handing page 3
    to the producer waits for the topic's metadata (until the publisher creates the topic again,
    at most every 2 s). Page 2's position used to be recorded only once that send returned;
    now the stalled round records it before reporting "waiting for broker"."""
    statuses: list[PublisherStatus] = []
    with FlowStore(store_url, live_projections=False) as store:
        store.create_flow(linear("f", 2))
        for n in range(12):
            store.reset_flow(f"u{n}", "f")
        assert store.log_position() > 10  # three pages: 1-5, 6-10, 11-...
        publisher = KafkaPublisher(
            store, own_broker.bootstrap, topic, batch=5, flush_timeout=0.5,
            # The producer soon learns that the restarted broker has no such topic.
            producer_config={"metadata_max_age_ms": 100},
            on_status=statuses.append,
        )  # fmt: skip
        read_plain_events = store.read_plain_events

        def topic_known() -> bool:
            assert publisher._producer is not None
            try:
                publisher._producer.partitions_for(topic)  # waits max_block_ms when unknown
            except KafkaTimeoutError:
                return False
            return True

        def read(start: int, limit: int = 1000) -> list[tuple[int, Any]]:
            # Called for page 3 right after page 2 was handed to the producer, before page 1 is
            # recorded: page 2 is acknowledged, then the topic disappears with the old broker.
            if start == 11 and own_broker.running:
                assert publisher._producer is not None
                publisher._producer.flush()
                own_broker.stop()
                own_broker.start_again()
                wait_until(lambda: not topic_known(), "the producer to forget the topic")
            return read_plain_events(start, limit)

        monkeypatch.setattr(store, "read_plain_events", read)
        assert publisher.lock.acquire()
        try:
            assert publisher.publish_pending() == store.log_position()
        finally:
            publisher.close()
        stalls = [s for s in statuses if s.state == "waiting for broker"]
        assert stalls, "the send of page 3 did not stall"
        assert "KafkaTimeoutError" in (stalls[0].last_error or "")
        # Recorded by the first stalled round, not once page 3 got through.
        assert stalls[0].position == 10
        assert publisher.tracking.position(topic) == store.log_position()
        # The broker restarted empty: everything after page 2 reached the new one.
        check_topic(own_broker.bootstrap, topic, store, since=10)


class _Future:
    """What `acknowledged_run` reads of a kafka-python future: done or not, failed or not."""

    def __init__(self, answer: str) -> None:
        self.is_done = answer != "pending"
        self._failed = answer == "refused"

    def failed(self) -> bool:
        return self._failed


ANSWERS = st.sampled_from(["acknowledged", "acknowledged", "pending", "refused"])


@given(
    pages=st.lists(
        st.lists(ANSWERS, min_size=1, max_size=6).flatmap(
            lambda answers: st.tuples(
                st.just(answers), st.integers(min_value=0, max_value=len(answers))
            )
        ),
        max_size=3,
    )
)
def test_the_acknowledged_run_is_the_longest_acknowledged_prefix_of_what_was_handed_over(
    pages: list[tuple[list[str], int]],
) -> None:
    """Events numbered 1, 2, ... across the pages; a page's messages handed to the producer so
    far have futures (the last page may be partly handed over)."""
    from flowstore.adapters.kafka.publisher import _Sent

    sent, handed, number = [], [], 0
    for answers, count in pages:
        events = [(number + i + 1, None) for i in range(len(answers))]
        number += len(answers)
        futures = [_Future(a) for a in answers[:count]]
        sent.append(_Sent(events, futures, 0.0))
        handed.append((events, answers[:count], count == len(answers)))
    expected = 0
    for events, answers, whole in handed:
        for (n, _), answer in zip(events, answers, strict=False):
            if answer != "acknowledged":
                break
            expected = n
        else:
            if whole:
                continue
        break
    assert acknowledged_run(sent) == expected
