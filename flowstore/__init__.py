"""flowstore: an event-sourced flow state store.

Keeps, for every (user, flow), where the user stands, how they got there and what happened on the way.
Start with `FlowStore()` (embedded SQLite) and `create_flow(...)`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flowstore.errors import (
    ConcurrencyConflictError,
    CorruptEventError,
    DefinitionError,
    EncryptionKeyError,
    FlowError,
    FlowExistsError,
    FlowNotFoundError,
    FlowStateCorruptionError,
    FlowStateNotFoundError,
    FollowerBusyError,
    InvalidArgumentError,
    InvalidStepError,
    InvalidTransitionError,
    PayloadTooLargeError,
    PayloadValidationError,
    ProjectionLagError,
    ProjectionLayoutError,
    RebuildRunningError,
    StateTokenError,
    StateTokenFlowError,
    StateTokenFormatError,
    StateTokenStepError,
    StorageUnavailableError,
    StoreClosedError,
)

if TYPE_CHECKING:
    from flowstore.adapters.alembic import include_name as alembic_include_name
    from flowstore.adapters.alembic import include_object as alembic_include_object
    from flowstore.adapters.alembic import metadata
    from flowstore.aio import AsyncFlowStore
    from flowstore.definitions import FlowDefinition, FlowStep, FlowTransition, validate_flow
    from flowstore.models import (
        FlowState,
        FlowStateHistory,
        FlowStatistics,
        FlowStatus,
        FunnelStep,
        HistoryKind,
        InstanceMigration,
        MigrationReport,
        PerformanceMetrics,
        StepCount,
    )
    from flowstore.storage import StorageConfigError
    from flowstore.store import FlowStore
    from flowstore.tokens import decode_state_token, encode_state_token

__version__ = "0.1.0"

# Everything but the errors loads on first use: the store pulls in eventsourcing, SQLAlchemy and
# cryptography, the models pydantic and jsonschema. `import flowstore.domain` (or a consumer of the
# Kafka envelope) stays free of the store, and `flowstore --help` starts without any of them.
_LAZY = {
    "AsyncFlowStore": "flowstore.aio",
    "FlowStore": "flowstore.store",
    "StorageConfigError": "flowstore.storage",
    **dict.fromkeys(("decode_state_token", "encode_state_token"), "flowstore.tokens"),
    **dict.fromkeys(
        ("FlowDefinition", "FlowStep", "FlowTransition", "validate_flow"), "flowstore.definitions"
    ),
    **dict.fromkeys(
        (
            "FlowState",
            "FlowStateHistory",
            "FlowStatistics",
            "FlowStatus",
            "FunnelStep",
            "HistoryKind",
            "InstanceMigration",
            "MigrationReport",
            "PerformanceMetrics",
            "StepCount",
        ),
        "flowstore.models",
    ),
}


# Exported under another name than their module's: Alembic coexistence (flowstore.adapters.alembic),
# the store's tables and the env.py hooks.
_ALIASES = {
    "alembic_include_name": ("flowstore.adapters.alembic", "include_name"),
    "alembic_include_object": ("flowstore.adapters.alembic", "include_object"),
    "metadata": ("flowstore.adapters.alembic", "metadata"),
}


def __getattr__(name: str) -> Any:
    module, attribute = _ALIASES.get(name) or (_LAZY.get(name), name)
    if module is None:
        raise AttributeError(f"module 'flowstore' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_ALIASES))


__all__ = [
    "AsyncFlowStore",
    "ConcurrencyConflictError",
    "CorruptEventError",
    "DefinitionError",
    "EncryptionKeyError",
    "FlowDefinition",
    "FlowError",
    "FlowExistsError",
    "FlowNotFoundError",
    "FlowState",
    "FlowStateCorruptionError",
    "FlowStateHistory",
    "FlowStateNotFoundError",
    "FlowStatistics",
    "FlowStatus",
    "FlowStep",
    "FlowStore",
    "FlowTransition",
    "FollowerBusyError",
    "FunnelStep",
    "HistoryKind",
    "InstanceMigration",
    "InvalidArgumentError",
    "InvalidStepError",
    "InvalidTransitionError",
    "MigrationReport",
    "PayloadTooLargeError",
    "PayloadValidationError",
    "PerformanceMetrics",
    "ProjectionLagError",
    "ProjectionLayoutError",
    "RebuildRunningError",
    "StateTokenError",
    "StateTokenFlowError",
    "StateTokenFormatError",
    "StateTokenStepError",
    "StepCount",
    "StorageConfigError",
    "StorageUnavailableError",
    "StoreClosedError",
    "__version__",
    "alembic_include_name",
    "alembic_include_object",
    "decode_state_token",
    "encode_state_token",
    "metadata",
    "validate_flow",
]
