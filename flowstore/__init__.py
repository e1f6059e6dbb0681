"""flowstore: an event-sourced flow state store.

Keeps, for every (user, flow), where the user stands, how they got there and what happened on the way.
Start with `FlowStore()` (embedded SQLite) and `create_flow(...)`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flowstore.definitions import FlowDefinition, FlowStep, FlowTransition
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
    InvalidArgumentError,
    InvalidStepError,
    InvalidTransitionError,
    PayloadTooLargeError,
    PayloadValidationError,
    ProjectionLagError,
    ProjectionLayoutError,
    StorageUnavailableError,
)
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

if TYPE_CHECKING:
    from flowstore.storage import StorageConfigError
    from flowstore.store import FlowStore

__version__ = "0.1.0"

# The store and storage pull in eventsourcing, SQLAlchemy and cryptography; they load on first use so
# that `import flowstore.domain` (or a consumer of the Kafka envelope) stays free of them.
_LAZY = {"FlowStore": "flowstore.store", "StorageConfigError": "flowstore.storage"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'flowstore' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
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
    "StepCount",
    "StorageConfigError",
    "StorageUnavailableError",
    "__version__",
]
