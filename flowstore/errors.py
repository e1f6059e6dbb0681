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
     ├── ProjectionLayoutError                  PROJECTION_LAYOUT
     ├── RebuildRunningError                    REBUILD_RUNNING
     ├── DefinitionError (ValueError)           DEFINITION_INVALID
     ├── PayloadValidationError (ValueError)    PAYLOAD_INVALID
     │    └── PayloadTooLargeError              PAYLOAD_TOO_LARGE
     ├── StateTokenError (ValueError)           STATE_TOKEN_INVALID
     │    ├── StateTokenFormatError             STATE_TOKEN_MALFORMED
     │    ├── StateTokenFlowError               STATE_TOKEN_UNKNOWN_FLOW
     │    └── StateTokenStepError               STATE_TOKEN_UNKNOWN_STEP
     ├── StorageConfigError (ValueError)        STORAGE_CONFIG_INVALID
     ├── FollowerBusyError                      FOLLOWER_BUSY
     ├── StoreClosedError (RuntimeError)        STORE_CLOSED
     │   at the HTTP boundary (flowstore.adapters.http):
     ├── RequestInvalidError (ValueError)       REQUEST_INVALID
     ├── AuthenticationError                    UNAUTHENTICATED
     ├── PermissionDeniedError                  FORBIDDEN
     ├── AuthConfigError (ValueError)           AUTH_CONFIG_INVALID
     ├── CsrfError                              CSRF_INVALID
     ├── OperationRunningError                  OPERATION_RUNNING
     │   at the Kafka boundary (flowstore.adapters.kafka):
     ├── KafkaUnavailableError                  KAFKA_UNAVAILABLE
     ├── PublisherLockError                     KAFKA_PUBLISHER_LOCK
     ├── EnvelopeError (ValueError)             KAFKA_ENVELOPE_INVALID
     └── TopicIncompleteError (ValueError)      KAFKA_TOPIC_INCOMPLETE

Every error carries a stable `code` (used by the HTTP and CLI adapters to pick a status and an exit
code, see `adapters/errors.py`) and a `details` mapping naming the offending values. Errors that are
about bad input also derive from the fitting built-in, and a storage outage from `OSError`, so
callers can catch `ValueError`, `LookupError` or `OSError` without importing flowstore.

Every error pickles and unpickles as itself, with its code, message, details and attributes (a
`ProcessPoolExecutor` worker can raise one), whatever its constructor's arguments. The errors of
the adapters live here too, so that this tree is the whole list; the adapters re-export theirs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

__all__ = [
    "AuthConfigError",
    "AuthenticationError",
    "ConcurrencyConflictError",
    "CorruptEventError",
    "CsrfError",
    "DefinitionError",
    "EncryptionKeyError",
    "EnvelopeError",
    "FlowError",
    "FlowExistsError",
    "FlowNotFoundError",
    "FlowStateCorruptionError",
    "FlowStateNotFoundError",
    "FollowerBusyError",
    "InvalidArgumentError",
    "InvalidStepError",
    "InvalidTransitionError",
    "KafkaUnavailableError",
    "OperationRunningError",
    "PayloadTooLargeError",
    "PayloadValidationError",
    "PermissionDeniedError",
    "ProjectionLagError",
    "ProjectionLayoutError",
    "PublisherLockError",
    "RebuildRunningError",
    "RequestInvalidError",
    "StateTokenError",
    "StateTokenFlowError",
    "StateTokenFormatError",
    "StateTokenStepError",
    "StorageConfigError",
    "StorageUnavailableError",
    "StoreClosedError",
    "TopicIncompleteError",
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

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions pickle as `cls(*args)`, which fails or changes the message for any
        # constructor that does not take the message alone: rebuild from the state instead.
        return (_unpickle, (type(self), self.message, dict(self.__dict__)))


def _unpickle(cls: type[FlowError], message: str, state: dict[str, Any]) -> FlowError:
    error = cls.__new__(cls)
    BaseException.__init__(error, message)
    error.__dict__.update(state)
    return error


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

    def __init__(
        self,
        from_step: str,
        transition: str,
        *,
        flow_id: str | None = None,
        user_id: str | None = None,
        **details: Any,
    ) -> None:
        # (from_step, transition) alone, as the seed constructs it; the store adds the rest.
        where = f" in flow {flow_id!r}" if flow_id is not None else ""
        known = {"flow_id": flow_id, "user_id": user_id}
        why = f": {details['reason']}" if details.get("reason") else ""
        super().__init__(
            f"Invalid transition {transition!r} from step {from_step!r}{where}{why}",
            from_step=from_step,
            transition=transition,
            **{key: value for key, value in known.items() if value is not None},
            **details,
        )
        self.from_step = from_step
        self.transition = transition
        self.flow_id = flow_id
        self.user_id = user_id


class InvalidStepError(FlowError, ValueError):
    """A step named by the caller (reset target, override) does not exist in the definition, or
    may not be entered directly (`entry_steps` then lists the steps that may)."""

    code = "INVALID_STEP"

    def __init__(
        self,
        step: str,
        *,
        flow_id: str,
        definition_version: int,
        entry_steps: Sequence[str] | None = None,
    ) -> None:
        where = f"flow {flow_id!r} version {definition_version}"
        if entry_steps is None:
            message = f"Step {step!r} does not exist in {where}"
            more: dict[str, Any] = {}
        else:
            names = ", ".join(repr(name) for name in entry_steps)
            message = f"Step {step!r} of {where} cannot be entered directly (only {names})"
            more = {"entry_steps": list(entry_steps)}
        super().__init__(
            message, step=step, flow_id=flow_id, definition_version=definition_version, **more
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


class StoreClosedError(FlowError, RuntimeError):
    """The store was closed (`close()`, or the end of its `with` block): open a new one."""

    code = "STORE_CLOSED"

    def __init__(self, action: str = "used") -> None:
        super().__init__(f"The FlowStore is closed and cannot be {action}", action=action)


class ProjectionLagError(FlowError, TimeoutError):
    """The read-model tables did not reach this process's writes in time.

    The writes are safe in the log; the tables (and so `get_user_flows`, history, statistics) lag,
    usually because the database is slow or unavailable: the projector's last error is chained.
    """

    code = "PROJECTION_LAG"


class ProjectionLayoutError(FlowError):
    """The projection tables have a layout this code does not read: migrate them, or upgrade.

    Tables of an older layout stay as they are (a process of the previous version may still be
    serving them) until `flowstore projections migrate` builds the new layout beside them and
    swaps it in; a process whose layout was migrated away gets this error from then on.
    """

    code = "PROJECTION_LAYOUT"

    def __init__(self, found: int | None, expected: int) -> None:
        if found is None:
            advice = "they were migrated to another layout: restart this process on the new version"
        elif found < expected:
            advice = "run `flowstore projections migrate` (the old tables keep serving meanwhile)"
        else:
            advice = "this process is older than the tables: run the new version"
        super().__init__(
            f"projection tables have layout {found if found is not None else 'unknown'}, "
            f"this code reads layout {expected}: {advice}",
            found=found,
            expected=expected,
        )
        self.found = found
        self.expected = expected


class RebuildRunningError(FlowError):
    """Another rebuild of the projection tables is running (in any process on the same database).

    Two rebuilds at once would write the same shadow tables and swap in a mix of both; the second
    one is refused and changes nothing. Run it again once the first has finished.
    """

    code = "REBUILD_RUNNING"

    def __init__(self, where: str) -> None:
        super().__init__(f"Another rebuild of the projections is running ({where})", where=where)


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


class StateTokenError(FlowError, ValueError):
    """A state token (`flowstore.decode_state_token`) cannot be read: malformed, or naming a flow
    or step the definition lacks."""

    code = "STATE_TOKEN_INVALID"


class StateTokenFormatError(StateTokenError):
    """The token is not base64url (no padding) of a UTF-8 JSON object with a string `f`."""

    code = "STATE_TOKEN_MALFORMED"

    def __init__(self, reason: str) -> None:
        super().__init__(f"State token is malformed: {reason}", reason=reason)
        self.reason = reason


class StateTokenFlowError(StateTokenError):
    """The token is for another flow than the definition given, or for a flow that does not exist."""

    code = "STATE_TOKEN_UNKNOWN_FLOW"

    def __init__(self, flow_id: str, expected: str | None = None) -> None:
        message = f"State token names flow {flow_id!r}"
        message += f", not {expected!r}" if expected is not None else ", which does not exist"
        super().__init__(message, flow_id=flow_id, expected=expected)
        self.flow_id = flow_id


class StateTokenStepError(StateTokenError):
    """No step of the flow has the step index the token names."""

    code = "STATE_TOKEN_UNKNOWN_STEP"

    def __init__(self, flow_id: str, index: str | None) -> None:
        super().__init__(
            f"State token names step index {index!r}, which flow {flow_id!r} does not have",
            flow_id=flow_id,
            index=index,
        )
        self.index = index


class StorageConfigError(FlowError, ValueError):
    """The database URL cannot be used."""

    code = "STORAGE_CONFIG_INVALID"


# The HTTP boundary (flowstore.adapters.http)


class RequestInvalidError(FlowError, ValueError):
    """The request does not match the API's schema (path, query, body or WebSocket message)."""

    code = "REQUEST_INVALID"

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        where = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors[:5])
        super().__init__(f"Invalid request: {where}", errors=errors)


class AuthenticationError(FlowError):
    """No token, or a token that is malformed, forged or expired (HTTP 401)."""

    code = "UNAUTHENTICATED"

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message, reason=reason)
        self.reason = reason


class PermissionDeniedError(FlowError):
    """The caller is authenticated but lacks the role the operation needs (HTTP 403)."""

    code = "FORBIDDEN"

    def __init__(self, role: str) -> None:
        super().__init__(f"This operation needs the {role!r} role", role=role)


class AuthConfigError(FlowError, ValueError):
    """The server's token settings are missing or unusable (`flowstore serve` exits on it)."""

    code = "AUTH_CONFIG_INVALID"


class CsrfError(FlowError):
    """A console POST without a valid CSRF token, or from another origin (HTTP 403)."""

    code = "CSRF_INVALID"

    def __init__(self, reason: str) -> None:
        super().__init__(f"Request refused: {reason}", reason=reason)


class OperationRunningError(FlowError):
    """An operation was asked for while another one is still running (HTTP 409)."""

    code = "OPERATION_RUNNING"

    def __init__(self, what: str, *, job: str, action: str) -> None:
        super().__init__(f"{what} is still running (job {job})", job=job, action=action)


class FollowerBusyError(FlowError):
    """Another process is the active follower of this name (`FlowStore.follow`)."""

    code = "FOLLOWER_BUSY"

    def __init__(self, name: str) -> None:
        super().__init__(f"Another process is following the log as {name!r}", name=name)
        self.name = name


# The Kafka boundary (flowstore.adapters.kafka)


class KafkaUnavailableError(FlowError):
    """The Kafka brokers could not be reached (or refused the request)."""

    code = "KAFKA_UNAVAILABLE"


class PublisherLockError(FlowError):
    """The publisher lock is not (or no longer) held: another publisher may be active."""

    code = "KAFKA_PUBLISHER_LOCK"


class EnvelopeError(FlowError, ValueError):
    """A message is not a flowstore event envelope, or names an event type this version lacks."""

    code = "KAFKA_ENVELOPE_INVALID"


class TopicIncompleteError(FlowError, ValueError):
    """The topic lacks events (a hole in some aggregate's versions): it cannot be restored."""

    code = "KAFKA_TOPIC_INCOMPLETE"
