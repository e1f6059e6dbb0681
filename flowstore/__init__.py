"""flowstore: an event-sourced flow state store.

Keeps, for every (user, flow), where the user stands, how they got there and what happened on the way.
Start with `FlowStore()` (embedded SQLite) and `create_flow(...)`.
"""

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
from flowstore.storage import StorageConfigError
from flowstore.store import FlowStore

__version__ = "0.1.0"

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
    "StepCount",
    "StorageConfigError",
    "StorageUnavailableError",
    "__version__",
]
