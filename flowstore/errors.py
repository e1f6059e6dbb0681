"""The errors flowstore raises, one tree under `FlowError`.

    FlowError                                   code
     ├── FlowNotFoundError (LookupError)        FLOW_NOT_FOUND
     │    └── FlowStateNotFoundError            FLOW_STATE_NOT_FOUND
     ├── FlowExistsError                        FLOW_EXISTS
     ├── InvalidTransitionError (ValueError)    INVALID_TRANSITION
     ├── InvalidStepError (ValueError)          INVALID_STEP
     ├── InvalidArgumentError (ValueError)      INVALID_ARGUMENT
     ├── FlowStateCorruptionError               FLOW_STATE_CORRUPTION
     │    └── CorruptEventError                 FLOW_STATE_CORRUPTION
     ├── ConcurrencyConflictError               CONCURRENCY_CONFLICT
     ├── EncryptionKeyError                     ENCRYPTION_KEY_INVALID
     ├── StorageUnavailableError (OSError)      STORAGE_UNAVAILABLE
     ├── ProjectionLagError (TimeoutError)      PROJECTION_LAG
     ├── DefinitionError (ValueError)           DEFINITION_INVALID
     └── PayloadValidationError (ValueError)    PAYLOAD_INVALID
          └── PayloadTooLargeError              PAYLOAD_TOO_LARGE

Every error carries a stable `code` (used by the HTTP and CLI adapters to pick a status and an exit
code, see `adapters/errors.py`) and a `details` mapping naming the offending values. Errors that are
about bad input also derive from the fitting built-in, and a storage outage from `OSError`, so
callers can catch `ValueError`, `LookupError` or `OSError` without importing flowstore.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

__all__ = [
    "ConcurrencyConflictError",
    "CorruptEventError",
    "DefinitionError",
    "EncryptionKeyError",
    "FlowError",
    "FlowExistsError",
    "FlowNotFoundError",
    "FlowStateCorruptionError",
    "FlowStateNotFoundError",
    "InvalidArgumentError",
    "InvalidStepError",
    "InvalidTransitionError",
    "PayloadTooLargeError",
    "PayloadValidationError",
    "ProjectionLagError",
    "StorageUnavailableError",
]


class FlowError(Exception):
    """Base class of every error flowstore raises on purpose."""

    code: ClassVar[str] = "FLOW_ERROR"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details: Mapping[str, Any] = details

    def to_dict(self) -> dict[str, Any]:
        """The error as plain data: code, message and details (for HTTP, Kafka and the CLI)."""
        return {"code": self.code, "message": self.message, "details": dict(self.details)}


class FlowNotFoundError(FlowError, LookupError):
    """The flow definition does not exist (or was deleted)."""

    code = "FLOW_NOT_FOUND"

    def __init__(self, flow_id: str, message: str | None = None, **details: Any) -> None:
        super().__init__(message or f"Flow {flow_id!r} not found", flow_id=flow_id, **details)
        self.flow_id = flow_id


class FlowStateNotFoundError(FlowNotFoundError):
    """The flow exists but the user has no state in it (never started, or cleared)."""

    code = "FLOW_STATE_NOT_FOUND"

    def __init__(self, user_id: str, flow_id: str) -> None:
        super().__init__(
            flow_id, f"User {user_id!r} has no state in flow {flow_id!r}", user_id=user_id
        )
        self.user_id = user_id


class FlowExistsError(FlowError, ValueError):
    """`create_flow` was given the id of a flow that already exists."""

    code = "FLOW_EXISTS"

    def __init__(self, flow_id: str) -> None:
        super().__init__(
            f"Flow {flow_id!r} already exists; use update_flow to make a new version",
            flow_id=flow_id,
        )
        self.flow_id = flow_id


class InvalidTransitionError(FlowError, ValueError):
    """The transition is not offered by the user's current step."""

    code = "INVALID_TRANSITION"

    def __init__(self, from_step: str, transition: str, *, flow_id: str, user_id: str) -> None:
        super().__init__(
            f"Invalid transition {transition!r} from step {from_step!r} in flow {flow_id!r}",
            from_step=from_step,
            transition=transition,
            flow_id=flow_id,
            user_id=user_id,
        )
        self.from_step = from_step
        self.transition = transition


class InvalidStepError(FlowError, ValueError):
    """A step named by the caller (reset target, override) does not exist in the definition."""

    code = "INVALID_STEP"

    def __init__(self, step: str, *, flow_id: str, definition_version: int) -> None:
        super().__init__(
            f"Step {step!r} does not exist in flow {flow_id!r} version {definition_version}",
            step=step,
            flow_id=flow_id,
            definition_version=definition_version,
        )
        self.step = step


class InvalidArgumentError(FlowError, ValueError):
    """An id or name argument is empty, too long or not a string."""

    code = "INVALID_ARGUMENT"

    def __init__(self, name: str, value: object, reason: str) -> None:
        super().__init__(f"{name} {value!r} is invalid: {reason}", argument=name, value=repr(value))


class FlowStateCorruptionError(FlowError):
    """Stored state contradicts its definition or its event log."""

    code = "FLOW_STATE_CORRUPTION"

    def __init__(self, user_id: str, flow_id: str, detail: str) -> None:
        super().__init__(
            f"Flow state corrupted for user {user_id!r}, flow {flow_id!r}: {detail}",
            user_id=user_id,
            flow_id=flow_id,
            detail=detail,
        )
        self.user_id = user_id
        self.flow_id = flow_id
        self.detail = detail


class CorruptEventError(FlowStateCorruptionError):
    """An event in the log cannot be read: undecodable bytes, an unknown type, invalid fields.

    The log is append-only, so the event stays; whatever reads it (the instance it belongs to,
    projections, the publisher) stops there with this error rather than skip history. Restore the
    store from the Kafka topic (`flowstore restore`) or a backup to get past it.
    """

    def __init__(self, aggregate_id: object, version: int, detail: str) -> None:
        FlowError.__init__(
            self,
            f"Event {aggregate_id} v{version} in the log cannot be read: {detail}",
            aggregate_id=str(aggregate_id),
            version=version,
            detail=detail,
        )
        self.user_id = ""
        self.flow_id = ""
        self.detail = detail


class ConcurrencyConflictError(FlowError):
    """Other writers kept changing the same instance; the command gave up after its retries."""

    code = "CONCURRENCY_CONFLICT"

    def __init__(self, user_id: str, flow_id: str, attempts: int) -> None:
        super().__init__(
            f"Gave up on user {user_id!r} in flow {flow_id!r} after {attempts} conflicting attempts",
            user_id=user_id,
            flow_id=flow_id,
            attempts=attempts,
        )


class EncryptionKeyError(FlowError):
    """The event log cannot be read with the configured key (wrong, missing or malformed)."""

    code = "ENCRYPTION_KEY_INVALID"


class StorageUnavailableError(FlowError, OSError):
    """The database cannot be reached or written: server down, connection lost, file read-only.

    The command that raises it was not applied, with one exception: when a PostgreSQL connection is
    lost while the commit itself is under way, the database alone knows whether it went through
    (read the state before repeating a command that must not run twice). The cause is chained.
    """

    code = "STORAGE_UNAVAILABLE"

    def __init__(self, backend: str, action: str, reason: str) -> None:
        super().__init__(
            f"{backend} is unavailable: {action} failed: {reason}",
            backend=backend,
            action=action,
            reason=reason,
        )
        self.backend = backend
        self.action = action


class ProjectionLagError(FlowError, TimeoutError):
    """The read-model tables did not reach this process's writes in time.

    The writes are safe in the log; the tables (and so `get_user_flows`, history, statistics) lag,
    usually because the database is slow or unavailable: the projector's last error is chained.
    """

    code = "PROJECTION_LAG"


class DefinitionError(FlowError, ValueError):
    """A flow definition (or an update to one) is malformed; `problems` lists every problem found."""

    code = "DEFINITION_INVALID"

    def __init__(self, flow_id: str | None, problems: Sequence[str]) -> None:
        name = repr(flow_id) if flow_id else "(unnamed)"
        super().__init__(
            f"Flow definition {name} is invalid: " + "; ".join(problems),
            flow_id=flow_id,
            problems=list(problems),
        )
        self.flow_id = flow_id
        self.problems = list(problems)


class PayloadValidationError(FlowError, ValueError):
    """A payload is not a JSON object, or fails the transition's JSON Schema."""

    code = "PAYLOAD_INVALID"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message, **details)


class PayloadTooLargeError(PayloadValidationError):
    """A payload's JSON encoding is larger than the store's limit."""

    code = "PAYLOAD_TOO_LARGE"

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"Payload of {size} bytes exceeds the limit of {limit} bytes", size=size, limit=limit
        )
