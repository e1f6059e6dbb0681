"""The one mapping from a flowstore error to an HTTP status and a CLI exit code."""

from __future__ import annotations

from typing import NamedTuple

from flowstore.errors import FlowError

__all__ = ["DIFFERENCES_EXIT_CODE", "ErrorMapping", "known_codes", "mapping_for"]

DIFFERENCES_EXIT_CODE = 8
"""`flowstore projections verify` (and `flowstore audit`) found the tables or topic disagreeing."""


class ErrorMapping(NamedTuple):
    """How an error code is reported outside the library."""

    http_status: int
    exit_code: int


# Exit codes: 1 is reserved for unexpected failures, 2 for command-line usage errors (argparse),
# 8 for DIFFERENCES_EXIT_CODE.
_BY_CODE: dict[str, ErrorMapping] = {
    "FLOW_NOT_FOUND": ErrorMapping(404, 3),
    "FLOW_STATE_NOT_FOUND": ErrorMapping(404, 3),
    "FLOW_EXISTS": ErrorMapping(409, 4),
    "CONCURRENCY_CONFLICT": ErrorMapping(409, 4),
    "INVALID_TRANSITION": ErrorMapping(422, 5),
    "INVALID_STEP": ErrorMapping(422, 5),
    "INVALID_ARGUMENT": ErrorMapping(422, 5),
    "DEFINITION_INVALID": ErrorMapping(422, 5),
    "PAYLOAD_INVALID": ErrorMapping(422, 5),
    "PAYLOAD_TOO_LARGE": ErrorMapping(413, 5),
    "STATE_TOKEN_INVALID": ErrorMapping(422, 5),
    "STATE_TOKEN_MALFORMED": ErrorMapping(422, 5),
    "STATE_TOKEN_UNKNOWN_FLOW": ErrorMapping(422, 5),
    "STATE_TOKEN_UNKNOWN_STEP": ErrorMapping(422, 5),
    "STORAGE_CONFIG_INVALID": ErrorMapping(500, 6),
    # A programming error in the embedding application (a store used after close()).
    "STORE_CLOSED": ErrorMapping(500, 1),
    "ENCRYPTION_KEY_INVALID": ErrorMapping(500, 6),
    "FLOW_STATE_CORRUPTION": ErrorMapping(500, 7),
    # The database is down, unreachable or read-only: worth retrying later (the readiness probe in
    # adapters/http reports the same code).
    "STORAGE_UNAVAILABLE": ErrorMapping(503, 9),
    "PROJECTION_LAG": ErrorMapping(503, 9),
    # The tables await `flowstore projections migrate` (or this process is of an older version).
    "PROJECTION_LAYOUT": ErrorMapping(503, 6),
    # Another process is the active follower of a name (`flowstore follow`): a conflict.
    "FOLLOWER_BUSY": ErrorMapping(409, 4),
    # Another process (or thread) is rebuilding the tables: try again once it has finished.
    "REBUILD_RUNNING": ErrorMapping(409, 4),
    # Raised by the HTTP adapter (adapters/http). `flowstore serve` can exit on AUTH_CONFIG_INVALID;
    # the others only reach HTTP clients, so their exit code is the generic one.
    "REQUEST_INVALID": ErrorMapping(422, 5),
    "UNAUTHENTICATED": ErrorMapping(401, 1),
    "FORBIDDEN": ErrorMapping(403, 1),
    "AUTH_CONFIG_INVALID": ErrorMapping(500, 6),
    # Raised by the web console (adapters/http/console), only ever seen by browsers.
    "CSRF_INVALID": ErrorMapping(403, 1),
    "OPERATION_RUNNING": ErrorMapping(409, 1),
    # Raised by the Kafka adapter (adapters/kafka): the broker is down (retry later), another
    # publisher holds the lock, a message is not ours, the topic cannot be restored from.
    "KAFKA_UNAVAILABLE": ErrorMapping(503, 9),
    "KAFKA_PUBLISHER_LOCK": ErrorMapping(409, 4),
    "KAFKA_ENVELOPE_INVALID": ErrorMapping(422, 5),
    "KAFKA_TOPIC_INCOMPLETE": ErrorMapping(422, 8),
}
_DEFAULT = ErrorMapping(500, 1)


def mapping_for(error: FlowError) -> ErrorMapping:
    """The HTTP status and exit code for an error (by its stable `code`)."""
    return _BY_CODE.get(error.code, _DEFAULT)


def known_codes() -> frozenset[str]:
    """Every code this map names (a test checks each FlowError subclass has its own entry)."""
    return frozenset(_BY_CODE)
