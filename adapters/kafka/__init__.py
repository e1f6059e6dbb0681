"""Kafka: publish a store's events to a topic, consume them elsewhere, audit and restore from it.

The envelope (`flowstore.adapters.kafka.envelope`) needs only pydantic and orjson, so services that consume
the topic with another client can use it without kafka-python; everything else needs the `kafka`
extra and is imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from flowstore.adapters.kafka.envelope import (
    EVENT_TYPES,
    EnvelopeError,
    FlowEventEnvelope,
    message_key,
)

if TYPE_CHECKING:
    from flowstore.adapters.kafka.audit import AuditFinding, AuditReport, audit_topic
    from flowstore.adapters.kafka.consumer import FlowEventConsumer, TopicMessage, read_topic
    from flowstore.adapters.kafka.publisher import (
        DEFAULT_TOPIC,
        EmbeddedPublisher,
        KafkaPublisher,
        KafkaUnavailableError,
        PublisherLockError,
        PublisherStatus,
        embedded_publisher_from_env,
        ensure_topic,
        kafka_publisher,
        start_embedded_publisher,
    )
    from flowstore.adapters.kafka.restore import (
        RestoreReport,
        TopicIncompleteError,
        restore_from_kafka,
    )

__all__ = [
    "DEFAULT_TOPIC",
    "EVENT_TYPES",
    "AuditFinding",
    "AuditReport",
    "EmbeddedPublisher",
    "EnvelopeError",
    "FlowEventConsumer",
    "FlowEventEnvelope",
    "KafkaPublisher",
    "KafkaUnavailableError",
    "PublisherLockError",
    "PublisherStatus",
    "RestoreReport",
    "TopicIncompleteError",
    "TopicMessage",
    "audit_topic",
    "embedded_publisher_from_env",
    "ensure_topic",
    "kafka_publisher",
    "message_key",
    "read_topic",
    "restore_from_kafka",
    "start_embedded_publisher",
]

_LAZY = {
    "AuditFinding": "audit",
    "AuditReport": "audit",
    "audit_topic": "audit",
    "FlowEventConsumer": "consumer",
    "TopicMessage": "consumer",
    "read_topic": "consumer",
    "DEFAULT_TOPIC": "publisher",
    "EmbeddedPublisher": "publisher",
    "KafkaPublisher": "publisher",
    "KafkaUnavailableError": "publisher",
    "PublisherLockError": "publisher",
    "PublisherStatus": "publisher",
    "embedded_publisher_from_env": "publisher",
    "ensure_topic": "publisher",
    "kafka_publisher": "publisher",
    "start_embedded_publisher": "publisher",
    "RestoreReport": "restore",
    "TopicIncompleteError": "restore",
    "restore_from_kafka": "restore",
}


def __getattr__(name: str) -> Any:
    # Imported on first use: the modules below import kafka-python.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"flowstore.adapters.kafka.{module}"), name)
