"""`FlowStore`: the service. Commands append events; queries read aggregates and the log.

Every command on a user's flow follows one path (`_change_instance`): read the instance, decide the
events with a pure function from `flowstore.domain`, append them. A concurrent append to the same
instance makes the append fail on its version; the command then re-reads and decides again, so a
transition is always validated against the state it is applied to.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import os
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self, TypeVar, cast
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.cryptography import AESCipher
from eventsourcing.persistence import (
    IntegrityError,
    InterfaceError,
    InternalError,
    Mapper,
    OperationalError,
    Transcoder,
)
from pydantic import ValidationError

from flowstore.codec import OrjsonTranscoder, PydanticMapper
from flowstore.definitions import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    MAX_NAME_LENGTH,
    FlowDefinition,
    check_payload,
    has_control_characters,
    parse_definition,
    update_definition,
)
from flowstore.diagrams import DIAGRAM_FORMATS, DiagramStats, text_diagram
from flowstore.domain import (
    CATALOG_ID,
    Decision,
    DomainEvent,
    FlowCatalog,
    FlowErased,
    FlowInstance,
    FlowVersions,
    InstanceEvent,
    define_flow,
    definition_id,
    delete_flow,
    end_flow,
    execute_transition,
    instance_id,
    list_flow,
    migrate_instance,
    migration_target,
    override_state,
    project,
    start_flow,
)
from flowstore.errors import (
    ConcurrencyConflictError,
    EncryptionKeyError,
    FlowError,
    FlowExistsError,
    FlowNotFoundError,
    FlowStateCorruptionError,
    FlowStateNotFoundError,
    InvalidArgumentError,
    InvalidStepError,
    StorageUnavailableError,
)
from flowstore.keys import ERASED_USER_PREFIX, MemoryKeyStore, SqlKeyStore, UserKeys
from flowstore.models import (
    FlowState,
    FlowStateHistory,
    FlowStatistics,
    FlowStatus,
    FunnelStep,
    InstanceMigration,
    MigrationReport,
)
from flowstore.storage import StorageConfig, parse_url, resolve_url

if TYPE_CHECKING:
    from flowstore.projections.live import LiveProjector
    from flowstore.projections.sql import Difference, SqlProjections

__all__ = ["FlowStore"]

T = TypeVar("T")

_log = logging.getLogger(__name__)

_LOG_PAGE = 1000
_OPEN_ATTEMPTS = 5


def _utc_now() -> datetime:
    return datetime.now(UTC)


KAFKA_BOOTSTRAP_ENV = "FLOWSTORE_KAFKA_BOOTSTRAP"
"""Kafka bootstrap servers: when set, every FlowStore (unless kafka=False) publishes its log."""

CIPHER_KEY_ENV = "FLOWSTORE_CIPHER_KEY"
"""Base64 AES key (16, 24 or 32 bytes) that encrypts every event at rest."""


def _cipher_settings(cipher_key: str | None) -> dict[str, str]:
    # eventsourcing looks settings up with the application's name as a prefix first, so both the
    # plain and the FLOWSTORE_-prefixed names are set: the key given here is the only one used.
    key = cipher_key if cipher_key is not None else os.environ.get(CIPHER_KEY_ENV, "")
    if key:
        try:
            AESCipher.check_key_size(len(base64.b64decode(key, validate=True)))
        except (ValueError, binascii.Error) as exc:
            raise EncryptionKeyError(f"{CIPHER_KEY_ENV} is not a base64 AES key: {exc}") from None
    topic = "eventsourcing.cryptography:AESCipher" if key else ""
    return {
        "CIPHER_KEY": key,
        "FLOWSTORE_CIPHER_KEY": key,
        "CIPHER_TOPIC": topic,
        "FLOWSTORE_CIPHER_TOPIC": topic,
    }


def _require_id(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise InvalidArgumentError(name, value, f"must be a string, not {type(value).__name__}")
    if not value.strip():
        raise InvalidArgumentError(name, value, "must not be empty")
    if len(value) > MAX_NAME_LENGTH:
        raise InvalidArgumentError(name, value[:40] + "...", f"longer than {MAX_NAME_LENGTH}")
    if has_control_characters(value):
        raise InvalidArgumentError(name, value, "contains a control character or lone surrogate")
    if name == "user_id" and value.startswith(ERASED_USER_PREFIX):
        raise InvalidArgumentError(name, value, f"{ERASED_USER_PREFIX!r} marks erased users")
    return value


PUBLISHER_ENTRY_POINTS = "flowstore.publishers"
"""Entry-point group naming publisher factories by kind (`kafka`): how `kafka=` finds its adapter
without the service importing the adapters layer."""


class Publisher(Protocol):
    """A running embedded publisher (the port the service knows an adapter by)."""

    def stop(self) -> None:
        """Drain what can be drained and stop; called by `FlowStore.close()` before anything else."""


PublisherFactory = Callable[["FlowStore"], Publisher]
"""Starts a publisher for a store: `FlowStore(publisher=factory)` calls it once, while opening."""


def _plugin_publisher(kind: str, options: Mapping[str, Any]) -> PublisherFactory:
    """The factory an installed adapter registers for `kind`, bound to `options`."""
    from importlib.metadata import entry_points

    found = entry_points(group=PUBLISHER_ENTRY_POINTS, name=kind)
    try:
        make = next(iter(found)).load()
    except (StopIteration, ImportError) as exc:
        raise FlowError(
            f"{kind} publishing needs the {kind} extra (pip install 'flowstore-es[{kind}]'): "
            f"{exc or 'no adapter registered'}"
        ) from None
    return cast(PublisherFactory, make(**options))


class _FlowApplication(Application[UUID]):
    """The eventsourcing Application: orjson transcoder and pydantic mapper, immutable aggregates."""

    name = "FlowStore"

    def construct_transcoder(self) -> Transcoder:
        return OrjsonTranscoder()

    def construct_mapper(self) -> Mapper[UUID]:
        return self.factory.mapper(
            transcoder=self.construct_transcoder(), mapper_class=PydanticMapper
        )


class FlowStore:
    """Keeps, for every (user, flow), where the user stands, how they got there and what happened.

    `FlowStore()` opens the embedded SQLite file `./flowstore.db` (or `$FLOWSTORE_URL`); pass a URL for
    another database: `sqlite:///path.db`, `postgresql://user:pw@host:port/db` or `memory://`.

    `kafka` starts an embedded publisher that sends every event to Kafka in a background thread:
    bootstrap servers (a string) or `KafkaPublisher` options (a mapping with `bootstrap`, `topic`, ...);
    None (the default) uses `$FLOWSTORE_KAFKA_BOOTSTRAP` when it is set, False never publishes.
    `publisher` is the general port: a factory called with this store that returns a running
    `Publisher` (what `flowstore.adapters.kafka.kafka_publisher(...)` gives); the store stops it
    first on `close()`.

    With `live_projections` (the default) a background thread keeps the read-model tables up to date
    with this process's writes, and table queries wait for it, so they read your writes; without
    it, a separate worker (`flowstore projections run`) does that.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        cipher_key: str | None = None,
        kafka: str | Mapping[str, Any] | bool | None = None,
        publisher: PublisherFactory | None = None,
        max_retries: int = 10,
        cache_size: int = 10_000,
        statistics_window: float = 60.0,
        live_projections: bool = True,
        definition_refresh: float = 1.0,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self.config: StorageConfig = parse_url(resolve_url(url))
        self.max_payload_bytes = max_payload_bytes
        self.max_retries = max_retries
        self.statistics_window = statistics_window
        self.definition_refresh = definition_refresh
        self._cache_size = cache_size
        self._cache_lock = threading.Lock()
        # SQLite has one writer: threads of this process queue here, in order, rather than in
        # SQLite's busy-wait, which starves some of them under load. PostgreSQL needs no such lock.
        self._write_lock: AbstractContextManager[Any] = (
            nullcontext() if self.config.backend == "postgres" else threading.Lock()
        )
        self._instances: OrderedDict[UUID, FlowInstance] = OrderedDict()
        self._definitions: dict[str, tuple[FlowVersions, float]] = {}
        self._clock = clock
        env = {
            **self.config.env,
            "AGGREGATE_CACHE_MAXSIZE": str(cache_size),
            # Aggregates are frozen pydantic models: a cached one cannot be corrupted by a caller,
            # so the repository need not deep-copy it on every read.
            "DEEPCOPY_FROM_AGGREGATE_CACHE": "n",
            **_cipher_settings(cipher_key),
        }
        self._app = self._open(env)
        # Imported here, not at the top: projections import the domain, and the domain package
        # must stay importable without SQLAlchemy (see tests/test_package.py).
        from flowstore.projections.live import LiveProjector
        from flowstore.projections.sql import SqlProjections

        self.live_projections = live_projections
        self._live: LiveProjector | None = None
        opened: list[Callable[[], None]] = [self._app.close]
        try:
            with self._storage_errors(self.config.env, "opening the store"):
                self._keys = self._open_keys()
                opened.append(self._keys.close)
                self._check_key(cipher_key is not None or bool(os.environ.get(CIPHER_KEY_ENV)))
                self._projections = SqlProjections(self.config)
                opened.append(self._projections.close)
                if live_projections:
                    self._projections.catch_up(self.read_events)  # what happened while away
                    self._live = LiveProjector(self._project_written)
        except BaseException:
            for close in reversed(opened):
                with contextlib.suppress(Exception):
                    close()
            raise
        self._publisher: Publisher | None = None
        try:
            self._publisher = self._start_publisher(kafka, publisher)
        except BaseException:
            self.close()
            raise

    # Lifecycle

    def _start_publisher(
        self, kafka: str | Mapping[str, Any] | bool | None, publisher: PublisherFactory | None
    ) -> Publisher | None:
        """The embedded publisher: `publisher` if given, else Kafka's if asked for (`kafka`)."""
        if publisher is not None:
            if kafka not in (None, False):
                raise InvalidArgumentError("kafka", kafka, "pass either kafka= or publisher=, not both")
            return publisher(self)
        if kafka is False:
            return None
        if kafka is None or kafka is True:
            bootstrap = os.environ.get(KAFKA_BOOTSTRAP_ENV, "")
            if not bootstrap:
                if kafka is True:
                    raise FlowError(f"kafka=True needs ${KAFKA_BOOTSTRAP_ENV}")
                return None
            options: dict[str, Any] = {"bootstrap": bootstrap}
        elif isinstance(kafka, str):
            options = {"bootstrap": kafka}
        else:
            options = dict(kafka)
        return _plugin_publisher("kafka", options)(self)

    def _check_key(self, encrypted: bool) -> None:
        """Refuse to open a log this store cannot read: a wrong key, or a missing one."""
        first = self._app.recorder.select_notifications(1, 1)
        if not first:
            return
        try:
            self._app.mapper.to_domain_event(first[0])
        except FlowError as exc:  # AES-GCM tag mismatch, or ciphertext fed to the JSON decoder
            if not encrypted and first[0].state.startswith(b"{"):
                return  # plain JSON, so not encrypted: merely corrupt, which reading it will say
            hint = (
                "the key does not match the one the log was written with"
                if encrypted
                else (f"the log is encrypted: set {CIPHER_KEY_ENV} or pass cipher_key")
            )
            raise EncryptionKeyError(f"Cannot read the event log: {hint}") from exc

    def _open_keys(self) -> UserKeys:
        """The users' keys (see `flowstore.keys`), wrapped with the store's cipher if it has one."""
        keys: UserKeys
        if self.config.sqlalchemy_url is None:
            keys = MemoryKeyStore(refresh=self.definition_refresh)
        else:
            keys = SqlKeyStore(
                self.config, self._app.mapper.cipher, refresh=self.definition_refresh
            )
        cast(PydanticMapper, self._app.mapper).keys = keys
        return keys

    @staticmethod
    def _open(env: dict[str, str]) -> _FlowApplication:
        # Processes starting together on one PostgreSQL database race on CREATE TABLE IF NOT EXISTS
        # ("tuple concurrently updated", or a unique violation in pg_type); the loser just retries.
        for attempt in range(_OPEN_ATTEMPTS):
            try:
                with FlowStore._storage_errors(env, "opening the event store"):
                    app = _FlowApplication(env=env)
            except (InternalError, IntegrityError):
                if attempt == _OPEN_ATTEMPTS - 1:
                    raise
                FlowStore._backoff(attempt)
                continue
            # A read-only SQLite file opens fine and fails on the first write (a command, or the
            # projections' bookkeeping): refuse it here, as SQLite itself decides (no write access).
            path = env.get("SQLITE_DBNAME", "")
            for file in (path, f"{path}-wal") if path else ():
                if os.path.exists(file) and not os.access(file, os.W_OK):
                    app.close()
                    raise StorageUnavailableError(
                        "SQLite", "opening the event store", f"{file} is read-only"
                    )
            return app
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Publish and project what is left, release connections. The store is unusable after."""
        if self._publisher is not None:
            self._publisher.stop()  # first: it drains the log to Kafka, then releases its lock
        if self._live is not None:
            self._live.close()
        self._projections.close()
        self._keys.close()
        self._app.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # Flow definitions

    def create_flow(self, definition: FlowDefinition | Mapping[str, Any]) -> str:
        """Define a new flow (version 1) and return its id; a deleted flow's id gets a new version."""
        parsed = parse_definition(definition)

        def decide() -> list[DomainEvent]:
            versions = self._get(definition_id(parsed.flow), FlowVersions)
            if versions is not None and not versions.deleted:
                raise FlowExistsError(parsed.flow)
            now = self._clock()
            catalog = self._get(CATALOG_ID, FlowCatalog)
            return [
                *define_flow(versions, parsed, now=now),
                *list_flow(catalog, parsed.flow, now=now),
            ]

        self._append(decide, user_id="*", flow_id=parsed.flow)
        return parsed.flow

    def update_flow(
        self, flow_id: str, changes: FlowDefinition | Mapping[str, Any]
    ) -> FlowDefinition:
        """Make a new version: top-level keys in `changes` replace the old ones whole."""
        _require_id(flow_id, "flow_id")
        if isinstance(changes, FlowDefinition):
            changes = changes.to_seed()

        def decide() -> list[DomainEvent]:
            versions = self._live_versions(flow_id)
            return define_flow(
                versions, update_definition(versions.latest, changes), now=self._clock()
            )

        self._append(decide, user_id="*", flow_id=flow_id)
        return self.get_flow(flow_id)

    def delete_flow(self, flow_id: str) -> None:
        """Delete a flow: later transitions and resets on it raise `FlowNotFoundError`."""
        _require_id(flow_id, "flow_id")
        self._append(
            lambda: delete_flow(self._live_versions(flow_id), now=self._clock()),
            user_id="*",
            flow_id=flow_id,
        )

    def list_flows(self) -> list[FlowDefinition]:
        """The latest version of every flow that is not deleted, in order of creation."""
        catalog = self._get(CATALOG_ID, FlowCatalog)
        flows = []
        for flow_id in catalog.flow_ids if catalog else ():
            versions = self._get(definition_id(flow_id), FlowVersions)
            if versions is not None and not versions.deleted:
                flows.append(versions.latest)
        return flows

    def get_flow(self, flow_id: str, version: int | None = None) -> FlowDefinition:
        """A flow's definition: the latest version, or version `version` (numbered from 1)."""
        definition = self._live_versions(flow_id).get(version)
        if definition is None:
            raise FlowNotFoundError(
                flow_id, f"Flow {flow_id!r} has no version {version}", version=version
            )
        return definition

    # Definition changes, migration, diagrams

    _definition_listeners: tuple[Callable[[str], None], ...] = ()

    def on_definition_change(self, listener: Callable[[str], None]) -> Callable[[], None]:
        """Call `listener(flow_id)` after this store creates, updates or deletes a flow definition.

        Returns a function that removes the listener. Only changes made through this store object
        are seen: a cache that other processes' changes must reach needs an expiry as well.
        """
        self._definition_listeners = (*self._definition_listeners, listener)

        def remove() -> None:
            self._definition_listeners = tuple(
                known for known in self._definition_listeners if known is not listener
            )

        return remove

    def migrate_flows(
        self,
        flow_id: str,
        to_version: int,
        step_map: Mapping[str, str] | None = None,
        dry_run: bool = False,
    ) -> MigrationReport:
        """Move the flow's active instances to definition version `to_version`, one event each.

        A step `step_map` names goes where it says; any other step that exists in the target
        version maps to itself. Instances whose step maps nowhere are reported as `unmappable`
        and left alone; completed instances stay on their version. With `dry_run` nothing is
        written. Instances are found in the `flow_states` table and each move is decided again on
        the instance itself (`_change_instance`), so a user moving meanwhile is never lost.
        """
        _require_id(flow_id, "flow_id")
        if isinstance(to_version, bool) or not isinstance(to_version, int):
            raise InvalidArgumentError("to_version", to_version, "must be a version number")
        target = self._live_versions(flow_id).get(to_version)
        if target is None:
            raise FlowNotFoundError(
                flow_id, f"Flow {flow_id!r} has no version {to_version}", version=to_version
            )
        mapping = dict(step_map or {})
        for old, new in mapping.items():
            _require_id(old, "step_map key")
            if not isinstance(new, str) or target.step(new) is None:
                raise InvalidStepError(str(new), flow_id=flow_id, definition_version=to_version)
        migrated: list[InstanceMigration] = []
        unmappable: list[InstanceMigration] = []
        skipped = 0
        for row in self._tables.instances(flow_id, FlowStatus.ACTIVE):
            outcome: InstanceMigration | None = None

            def decide(instance: FlowInstance | None) -> Decision:
                nonlocal outcome
                outcome = None  # decided afresh on every attempt
                if (
                    instance is None
                    or instance.status is not FlowStatus.ACTIVE
                    or instance.definition_version == to_version
                ):
                    return Decision([])
                assert instance.step is not None
                to_step, reason = migration_target(instance, target, mapping)
                outcome = InstanceMigration(
                    user_id=instance.user_id,
                    from_version=instance.definition_version,
                    from_step=instance.step,
                    to_version=to_version,
                    to_step=to_step,
                    reason=reason,
                )
                if to_step is None or dry_run:
                    return Decision([])
                return Decision(
                    migrate_instance(instance, target, to_step=to_step, now=self._clock())
                )

            user_id = row["user_id"]
            if dry_run:
                decide(self._get(instance_id(user_id, flow_id), FlowInstance))
            else:
                try:
                    self._change_instance(user_id, flow_id, decide)
                except FlowStateNotFoundError:  # the row outlived its instance: nothing to move
                    outcome = None
            if outcome is None:
                skipped += 1
            elif outcome.to_step is None:
                unmappable.append(outcome)
            else:
                migrated.append(outcome)
        return MigrationReport(
            flow_id=flow_id,
            to_version=to_version,
            dry_run=dry_run,
            migrated=migrated,
            unmappable=unmappable,
            skipped=skipped,
        )

    def diagram(
        self,
        flow_id: str,
        format: str = "mermaid",
        stats: bool = False,
        version: int | None = None,
    ) -> str:
        """The flow as a state diagram: Mermaid `stateDiagram-v2` (default) or Graphviz DOT text.

        With `stats`, each step is labelled with the users on it now and each transition with how
        many runs took it and its drop-off (`flowstore.diagrams`), from the statistics tables.
        """
        if format not in DIAGRAM_FORMATS:
            raise InvalidArgumentError(
                "format", format, f"must be one of {', '.join(DIAGRAM_FORMATS)}"
            )
        definition = self.get_flow(flow_id, version)
        counts = None
        if stats:
            funnel = self._tables.funnel(flow_id)
            counts = DiagramStats(
                current={step.step: step.current for step in funnel},
                entered={step.step: step.entered for step in funnel},
                taken=self._tables.transition_counts(flow_id),
            )
        return text_diagram(definition, format, counts)

    def _definition_changed(self, flow_id: str) -> None:
        for listener in self._definition_listeners:
            try:
                listener(flow_id)
            except Exception:
                # The change is already committed: a failing listener must not make it look
                # failed to the caller, so it is logged and the others still run.
                _log.exception("definition listener %r failed for flow %r", listener, flow_id)

    # Commands on a user's flow

    def reset_flow(self, user_id: str, flow_id: str, step: str | None = None) -> FlowState:
        """Start or restart the user's run on the latest version, at `step` or the initial step."""
        _require_id(user_id, "user_id")
        if step is not None:
            _require_id(step, "step")

        def decide(instance: FlowInstance | None) -> Decision:
            definition = self._live_versions(flow_id).latest
            return Decision(
                start_flow(instance, definition, user_id=user_id, now=self._clock(), step=step)
            )

        return self._change_instance(user_id, flow_id, decide).to_state()

    def execute_transition(
        self,
        user_id: str,
        flow_id: str,
        transition: str,
        payload: dict[str, Any] | None = None,
    ) -> FlowState:
        """Take `transition` from the user's current step (starting the flow first if needed).

        A transition the step does not offer, or a payload its schema refuses, is recorded as a
        rejected attempt and raises `InvalidTransitionError` / `PayloadValidationError`.
        """
        decide = self._transition(user_id, flow_id, transition, payload, time.perf_counter())
        return self._change_instance(user_id, flow_id, decide).to_state()

    def execute_transitions(
        self,
        requests: Iterable[tuple[str, str, str, dict[str, Any] | None]],
        *,
        batch_size: int = 500,
    ) -> list[FlowState | FlowError]:
        """Apply many (user_id, flow_id, transition, payload) requests, one transaction per batch.

        Returns, in request order, the new state or the error of each request; a rejected
        transition is recorded as in `execute_transition`, and bad input writes nothing for its own
        request only. If another writer touched one of the batch's instances meanwhile, that batch
        is applied again one request at a time (each retried as usual).
        """
        results: list[FlowState | FlowError] = []
        batch: list[tuple[str, str, str, dict[str, Any] | None]] = []
        for request in requests:
            batch.append(request)
            if len(batch) >= batch_size:
                results.extend(self._apply_batch(batch))
                batch = []
        if batch:
            results.extend(self._apply_batch(batch))
        return results

    def _apply_batch(
        self, batch: list[tuple[str, str, str, dict[str, Any] | None]]
    ) -> list[FlowState | FlowError]:
        outcomes: list[FlowInstance | FlowError] = []
        events: list[DomainEvent] = []
        seen: dict[UUID, FlowInstance | None] = {}  # later requests see earlier ones' effects
        for user_id, flow_id, transition, payload in batch:
            try:
                decide = self._transition(
                    user_id, flow_id, transition, payload, time.perf_counter()
                )
                _require_id(flow_id, "flow_id")
                iid = instance_id(user_id, flow_id)
                if iid not in seen:
                    seen[iid] = self._cached_instance(iid)
                decision = decide(seen[iid])
            except FlowError as error:
                outcomes.append(error)
                continue
            updated = cast(FlowInstance, project(seen[iid], decision.events))
            seen[iid] = updated
            events.extend(decision.events)
            outcomes.append(decision.error or updated)
        try:
            self._save(events, decided_here=True)
        except IntegrityError:
            for iid in seen:
                self._forget_instance(iid)
            return [self._one(*request) for request in batch]
        for instance in seen.values():
            if instance is not None:
                self._remember_instance(instance)
        return [o if isinstance(o, FlowError) else o.to_state() for o in outcomes]

    def _one(
        self, user_id: str, flow_id: str, transition: str, payload: dict[str, Any] | None
    ) -> FlowState | FlowError:
        try:
            return self.execute_transition(user_id, flow_id, transition, payload)
        except FlowError as error:
            return error

    def _transition(
        self,
        user_id: str,
        flow_id: str,
        transition: str,
        payload: dict[str, Any] | None,
        began: float,
    ) -> Callable[[FlowInstance | None], Decision]:
        """Check a transition request's input, and return how to decide it on an instance."""
        _require_id(user_id, "user_id")
        _require_id(transition, "transition")
        checked = check_payload(payload, limit=self.max_payload_bytes)

        def decide(instance: FlowInstance | None) -> Decision:
            needed = instance.definition_version if instance and instance.is_live else 0
            versions = self._command_versions(flow_id, needed)
            now = self._clock()
            started: list[InstanceEvent] = []
            if instance is None or not instance.is_live:
                started = start_flow(
                    instance, versions.latest, user_id=user_id, now=now, reason="start"
                )
                instance = cast(FlowInstance, project(instance, started))
            definition = self._definition_of(instance, versions)
            decision = execute_transition(
                instance,
                definition,
                transition=transition,
                payload=checked,
                now=now,
                elapsed_ms=(time.perf_counter() - began) * 1000,
            )
            return Decision([*started, *decision.events], decision.error)

        return decide

    def set_flow_state(self, user_id: str, state: FlowState | Mapping[str, Any]) -> FlowState:
        """Administrative override: put the user at `state.step` (recorded as an event).

        The instance keeps its definition version unless `state.definition_version` names another;
        a user without state starts on the latest version.
        """
        _require_id(user_id, "user_id")
        if not isinstance(state, FlowState):
            try:
                state = FlowState.model_validate(state)
            except ValidationError as exc:
                raise InvalidArgumentError("state", state, str(exc)) from None
        new = state
        if new.service is not None:
            _require_id(new.service, "service")
        payload = check_payload(new.payload, limit=self.max_payload_bytes)

        def decide(instance: FlowInstance | None) -> Decision:
            versions = self._live_versions(new.flow)
            version = new.definition_version or (
                instance.definition_version if instance and instance.is_live else None
            )
            definition = versions.get(version)
            if definition is None:
                raise FlowNotFoundError(
                    new.flow, f"Flow {new.flow!r} has no version {version}", version=version
                )
            return Decision(
                override_state(
                    instance,
                    definition,
                    user_id=user_id,
                    step=new.step,
                    service=new.service,
                    ok=new.ok,
                    payload=payload,
                    now=self._clock(),
                )
            )

        return self._change_instance(user_id, new.flow, decide).to_state()

    def clear_flow_state(self, user_id: str, flow_id: str) -> None:
        """Forget where the user stands: `get_flow_state` returns None; the history stays."""
        _require_id(user_id, "user_id")

        def decide(instance: FlowInstance | None) -> Decision:
            if instance is None or not instance.is_live:
                self._get_versions(flow_id)  # unknown flow -> FlowNotFoundError
                raise FlowStateNotFoundError(user_id, flow_id)
            return Decision(end_flow(instance, now=self._clock(), kind="clear"))

        self._change_instance(user_id, flow_id, decide)

    def purge_expired_flows(self) -> int:
        """Expire every active instance idle past its definition's ttl; return how many."""
        now = self._clock()
        purged = 0
        for user_id, flow_id in self._tables.expired(now):
            expired = False

            def decide(current: FlowInstance | None) -> Decision:
                # Re-checked on the instance itself: the user may have moved on since the scan.
                nonlocal expired
                expired = current is not None and self._expired(current, now)
                if not expired:
                    return Decision([])
                assert current is not None
                return Decision(end_flow(current, now=now, kind="expiry"))

            self._change_instance(user_id, flow_id, decide)
            purged += expired
        return purged

    def erase_user(self, user_id: str) -> int:
        """Erase one user (crypto-shredding); return how many of their flow instances were erased.

        Appends `FlowErased` to each instance of the user (the tables delete that instance's state
        and history rows, found by instance id; the Kafka stream carries the event to other
        services), brings the tables up to date, then deletes the user's key: every event of the user, in the log and in any copy
        of it made from now on, reads with a stand-in user id (`erased:<subject>`) and no payload, while the log stays
        append-only and the statistics keep their (anonymous) counts. Erasing again is harmless
        and finishes an erasure interrupted half-way. The same user id may come back later: it
        starts afresh, under a new key.
        """
        _require_id(user_id, "user_id")
        erased = self._erase_instances(user_id)
        self._shred(user_id)
        # A write for the user racing the erasure (another process, with the key in its cache)
        # may have been sealed with the key just shredded: a second pass erases what it left.
        late = self._erase_instances(user_id)
        if late:
            self._shred(user_id)
        return erased + late

    def _erase_instances(self, user_id: str) -> int:
        """Append `FlowErased` to each of the user's instances not erased yet; return how many."""
        catalog = self._get(CATALOG_ID, FlowCatalog)
        erased = 0
        for flow_id in catalog.flow_ids if catalog else ():
            changed = False

            def decide(instance: FlowInstance | None) -> Decision:
                nonlocal changed
                changed = instance is not None and not instance.erased
                if instance is None or not changed:
                    return Decision([])
                return Decision(end_flow(instance, now=self._clock(), kind="erasure"))

            # Read from the log, not this process's cache: an instance it last saw erased may
            # have been started again by another process, and "nothing to do" appends nothing
            # that a stale version could conflict with.
            self._forget_instance(instance_id(user_id, flow_id))
            with contextlib.suppress(FlowStateNotFoundError):  # never started this flow
                self._change_instance(user_id, flow_id, decide)
            erased += changed
        return erased

    def _shred(self, user_id: str) -> None:
        """Delete the user's keys, once the tables have applied their erasure events.

        Rows are deleted by instance id whatever the events read with, but the funnel counts the
        erased run as dropped at its step by finding the instance's state row by the user id the
        `FlowErased` event carries, which is the real one only while the key exists.
        """
        self._project_written()
        self._keys.shred(user_id)

    # Queries

    def get_flow_state(self, user_id: str, flow_id: str) -> FlowState | None:
        """Where the user stands in the flow, or None if they have no state in it."""
        _require_id(user_id, "user_id")
        _require_id(flow_id, "flow_id")
        instance = self._get(instance_id(user_id, flow_id), FlowInstance)
        return instance.to_state() if instance is not None and instance.is_live else None

    def get_user_flows(self, user_id: str) -> list[FlowState]:
        """Every flow the user has state in (active or completed), oldest run first.

        Read from the `flow_states` table; a row naming a step its definition does not have raises
        `FlowStateCorruptionError` (`recover_flow_state` rebuilds the row from the log).
        """
        _require_id(user_id, "user_id")
        states = []
        for row in self._tables.user_flows(user_id):
            versions = self._get(definition_id(row["flow_id"]), FlowVersions)
            definition = versions.get(row["definition_version"]) if versions else None
            if definition is None or definition.step(row["step"]) is None:
                raise FlowStateCorruptionError(
                    user_id,
                    row["flow_id"],
                    f"projected step {row['step']!r} does not exist in definition version "
                    f"{row['definition_version']}",
                )
            states.append(FlowState.model_validate({**row, "flow": row["flow_id"]}))
        return states

    def get_flow_history(self, user_id: str, flow_id: str) -> list[FlowStateHistory]:
        """Every command on the user's flow, oldest first (empty if they never started it)."""
        _require_id(user_id, "user_id")
        _require_id(flow_id, "flow_id")
        rows = self._tables.history(user_id, flow_id)
        if not rows:
            self._get_versions(flow_id)  # unknown flow -> FlowNotFoundError
        return rows

    def get_flow_statistics(self, flow_id: str | None = None) -> FlowStatistics:
        """Usage and performance of one flow, or of all flows (read from the statistics tables)."""
        if flow_id is not None:
            self._get_versions(flow_id)
        return self._tables.statistics(flow_id, now=self._clock(), window=self.statistics_window)

    def get_flow_funnel(self, flow_id: str) -> list[FunnelStep]:
        """Per step of the flow: entered, moved on, dropped, and active there now."""
        definition = self._get_versions(flow_id).latest
        found = {step.step: step for step in self._tables.funnel(flow_id)}
        order = sorted(definition.steps.values(), key=lambda step: step.index)
        known = [
            found.pop(
                step.step, FunnelStep(step=step.step, entered=0, moved_on=0, dropped=0, current=0)
            )
            for step in order
        ]
        return known + sorted(found.values(), key=lambda step: step.step)  # steps of old versions

    # Projections: rebuild, verify, repair, recover

    def recover_flow_state(self, user_id: str, flow_id: str) -> FlowState | None:
        """Rebuild one instance's projected state and history rows from its events."""
        _require_id(user_id, "user_id")
        self._get_versions(flow_id)
        iid = instance_id(user_id, flow_id)
        self._tables.recover(
            (user_id, flow_id),
            lambda: cast(list[DomainEvent], list(self._app.events.get(iid))),
            self.read_events,
        )
        return self.get_flow_state(user_id, flow_id)

    def rebuild_projections(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Replay the whole log into fresh tables and swap them in; return the events replayed."""
        return self._tables.rebuild(self.read_events, progress=progress)

    def verify_projections(self) -> list[Difference]:
        """Every difference between the tables and the log (empty when they agree)."""
        return self._tables.verify(self.read_events)

    def repair_projections(
        self, user_id: str | None = None, flow_id: str | None = None
    ) -> list[Difference]:
        """Rewrite exactly the rows that differ from the log; return what was repaired."""
        return self._tables.repair(self.read_events, user_id=user_id, flow_id=flow_id)

    def catch_up_projections(self, batch: int = 1000) -> int:
        """Apply events the tables have not seen yet, `batch` per transaction; return the position."""
        return self._projections.catch_up(self.read_events, page=batch)

    @property
    def publisher(self) -> Publisher | None:
        """The embedded Kafka publisher (`flowstore.adapters.kafka.EmbeddedPublisher`), or None."""
        return self._publisher

    def sync_projections(self, timeout: float = 60.0) -> None:
        """Wait until the tables reflect every event this process wrote (table queries do this)."""
        if self._live is not None:
            self._live.wait(timeout)

    def projection_position(self) -> int:
        """The notification id of the last event the tables reflect."""
        return self._projections.position()

    def read_events(self, start: int, limit: int = 1000) -> list[tuple[int, DomainEvent]]:
        """Up to `limit` events of the log from notification id `start` on: (id, event) pairs.

        Ids increase in commit order (they may have gaps); page with `start = last_id + 1`. This is
        the stream publishers, pushers and auditors follow.
        """
        with self._storage_errors(self.config.env, "reading the log"):
            page = self._app.recorder.select_notifications(start, limit)
        events = cast(PydanticMapper, self._app.mapper).to_domain_events(page)
        return [(n.id, event) for n, event in zip(page, events, strict=True)]

    def import_events(self, events: Iterable[DomainEvent], *, batch: int = 500) -> int:
        """Append events recorded elsewhere (a restore), as they are: same ids, versions, times.

        Each aggregate's events must come in version order without duplicates; an event whose
        version is already taken raises `ConcurrencyConflictError` and its batch is not written.
        Returns how many events were appended; projections are brought up to date at the end.
        """
        pending: list[DomainEvent] = []
        appended = 0

        erased: set[str] = set()  # users erased in the stream whose keys are still to be shredded

        def flush() -> None:
            nonlocal appended
            if not pending:
                return
            try:
                self._save(pending)
            except IntegrityError:
                first = pending[0]
                raise ConcurrencyConflictError(
                    str(getattr(first, "user_id", "*")),
                    str(getattr(first, "flow_id", "*")),
                    1,
                ) from None
            appended += len(pending)
            pending.clear()

        for event in events:
            if isinstance(event, FlowErased):
                # Erased in the source: erase here too. Its user is whoever the instance's events
                # named (the event itself may carry a stand-in id, if published after the
                # erasure); their key is shredded once all their erasures are in, or before
                # their next run (which gets a new key).
                flush()
                instance = self._get(event.originator_id, FlowInstance)
                if instance is not None:
                    event = event.model_copy(update={"user_id": instance.user_id})
                erased.add(event.user_id)
            elif (user := getattr(event, "user_id", None)) in erased:
                flush()
                self._shred(user)
                erased.discard(user)
            pending.append(event)
            if len(pending) >= batch:
                flush()
        flush()
        for user in erased:
            self._shred(user)
        return appended

    def log_position(self) -> int:
        """The notification id of the newest event in the log (0 when the log is empty)."""
        with self._storage_errors(self.config.env, "reading the log"):
            return self._app.recorder.max_notification_id() or 0

    # Internals

    def _save(self, events: Sequence[DomainEvent], *, decided_here: bool = False) -> None:
        """Append events (all or none) and hand them to the live projector.

        `decided_here` says the events were just decided by this store, stamped by its clock: then
        a conflict where the log already holds these very events is our own append, committed but
        unacknowledged (eventsourcing's PostgreSQL recorder retries an insert whose connection
        dropped, and the retry meets the rows it wrote), and it counts as done. Events copied
        from elsewhere (`import_events`) must not pass it: finding them stored proves nothing.
        """
        with self._storage_errors(self.config.env, "appending events"):
            # The users' keys first, outside the write lock: creating one is a transaction of
            # its own, and the mapper, sealing under the lock, then finds them cached.
            for user in {e.user_id for e in events if isinstance(e, InstanceEvent)}:
                self._keys.for_user(user)
            try:
                with self._write_lock:
                    recordings = self._app.save(*events)
            except IntegrityError:
                if not decided_here:
                    raise
                first = events[0]  # the insert is atomic: the first event settles it for all
                stored = self._app.events.get(
                    first.originator_id,
                    gt=first.originator_version - 1,
                    lte=first.originator_version,
                )
                if list(stored) != [first]:
                    raise
                _log.warning(
                    "append at %s v%d was committed but not acknowledged; counted once",
                    first.originator_id,
                    first.originator_version,
                )
                position = self._app.recorder.max_notification_id() or 0  # past our events
            else:
                position = recordings[-1].notification.id if recordings else 0
        if self._live is not None and position:
            self._live.written(position)

    def _project_written(self) -> int:
        # On SQLite the projector and this process's writers take turns on the Python lock:
        # waiting in SQLite's busy handler instead sleeps in steps of up to 100 ms.
        with self._write_lock:
            return self._projections.catch_up(self.read_events)

    @property
    def _tables(self) -> SqlProjections:
        """The read-model tables, once they reflect everything this process wrote."""
        self.sync_projections()
        return self._projections

    def _get(self, aggregate_id: UUID, kind: type[T]) -> T | None:
        try:
            reading = f"reading {kind.__name__} {aggregate_id}"
            with self._storage_errors(self.config.env, reading):
                aggregate: object = self._app.repository.get(
                    aggregate_id, projector_func=cast(Any, project)
                )
        except AggregateNotFoundError:
            return None
        if not isinstance(aggregate, kind):
            msg = f"aggregate {aggregate_id} is a {type(aggregate).__name__}, not {kind.__name__}"
            raise FlowStateCorruptionError("*", "*", msg)
        return aggregate

    def _get_versions(self, flow_id: str) -> FlowVersions:
        _require_id(flow_id, "flow_id")
        versions = self._get(definition_id(flow_id), FlowVersions)
        if versions is None:
            raise FlowNotFoundError(flow_id)
        return versions

    def _cached_instance(self, iid: UUID) -> FlowInstance | None:
        with self._cache_lock:
            cached = self._instances.get(iid)
            if cached is not None:
                self._instances.move_to_end(iid)
                return cached
        return self._get(iid, FlowInstance)

    def _remember_instance(self, instance: FlowInstance) -> None:
        with self._cache_lock:
            self._instances[instance.id] = instance
            self._instances.move_to_end(instance.id)
            while len(self._instances) > self._cache_size:
                self._instances.popitem(last=False)

    def _forget_instance(self, iid: UUID) -> None:
        with self._cache_lock:
            self._instances.pop(iid, None)

    def _command_versions(self, flow_id: str, needed_version: int) -> FlowVersions:
        """The flow's definitions for a transition, cached for `definition_refresh` seconds.

        Versions never change once written, so a cached copy is only stale about new versions and
        deletion; this process's own changes drop the cache at once, other processes' are seen
        within `definition_refresh` seconds (or at once if an instance needs a newer version).
        """
        now = time.monotonic()
        with self._cache_lock:
            cached = self._definitions.get(flow_id)
        if (
            cached is not None
            and now - cached[1] < self.definition_refresh
            and needed_version <= len(cached[0].definitions)
        ):
            return cached[0]
        versions = self._live_versions(flow_id)
        with self._cache_lock:
            self._definitions[flow_id] = (versions, now)
        return versions

    def _live_versions(self, flow_id: str) -> FlowVersions:
        versions = self._get_versions(flow_id)
        if versions.deleted:
            raise FlowNotFoundError(flow_id, f"Flow {flow_id!r} was deleted", deleted=True)
        return versions

    @staticmethod
    def _definition_of(instance: FlowInstance, versions: FlowVersions) -> FlowDefinition:
        definition = versions.get(instance.definition_version)
        if definition is None:
            raise FlowStateCorruptionError(
                instance.user_id,
                instance.flow_id,
                f"runs on definition version {instance.definition_version}, which does not exist",
            )
        if instance.step is not None and definition.step(instance.step) is None:
            raise FlowStateCorruptionError(
                instance.user_id,
                instance.flow_id,
                f"step {instance.step!r} does not exist in version {instance.definition_version}",
            )
        return definition

    @staticmethod
    def _expired(instance: FlowInstance, now: datetime) -> bool:
        return (
            instance.status is FlowStatus.ACTIVE
            and instance.expires_at is not None
            and instance.expires_at <= now
        )

    def _change_instance(
        self, user_id: str, flow_id: str, decide: Callable[[FlowInstance | None], Decision]
    ) -> FlowInstance:
        """Read, decide, append; on a concurrent append, read the fresh state and decide again."""
        _require_id(flow_id, "flow_id")
        iid = instance_id(user_id, flow_id)
        for attempt in range(self.max_retries):
            # The first attempt trusts this process's last known state; if another writer moved
            # the instance on, the append fails on its version and the retry reads it fresh.
            instance = self._cached_instance(iid) if attempt == 0 else self._get(iid, FlowInstance)
            decision = decide(instance)
            if not decision.events:
                if instance is None:
                    raise FlowStateNotFoundError(user_id, flow_id)
                return instance
            try:
                self._save(decision.events, decided_here=True)
            except IntegrityError:
                self._forget_instance(iid)
                self._backoff(attempt)
                continue
            except StorageUnavailableError:
                self._forget_instance(iid)  # a commit cut off in flight may still have landed
                raise
            updated = cast(FlowInstance, project(instance, decision.events))
            self._remember_instance(updated)
            if decision.error is not None:
                raise decision.error
            return updated
        raise ConcurrencyConflictError(user_id, flow_id, self.max_retries)

    def _append(
        self, decide: Callable[[], list[DomainEvent]], *, user_id: str, flow_id: str
    ) -> None:
        """Append definition/catalog events, deciding again after a concurrent append."""
        for attempt in range(self.max_retries):
            events = decide()  # reads through _get, which reports a storage outage
            try:
                self._save(events, decided_here=True)
            except IntegrityError:
                self._backoff(attempt)
                continue
            self._definitions.pop(flow_id, None)
            self._definition_changed(flow_id)
            return
        raise ConcurrencyConflictError(user_id, flow_id, self.max_retries)

    @staticmethod
    @contextlib.contextmanager
    def _storage_errors(env: Mapping[str, str], action: str) -> Iterator[None]:
        """Raise `StorageUnavailableError` when the database fails under `action`.

        Down, cut off or read-only: eventsourcing's OperationalError and InterfaceError (already
        retried: ten attempts on PostgreSQL, each waiting up to POSTGRES_CONNECT_TIMEOUT for a
        connection), and SQLAlchemy's (the projection tables). Other errors pass through.
        """
        try:
            yield
        except Exception as exc:
            from sqlalchemy import exc as sql  # loaded already, by the projections

            if not isinstance(
                exc, OperationalError | InterfaceError | sql.OperationalError | sql.InterfaceError
            ):
                raise
            module = env.get("PERSISTENCE_MODULE", "")
            backend = {"eventsourcing.sqlite": "SQLite", "eventsourcing.postgres": "PostgreSQL"}
            reason = str(getattr(exc, "orig", None) or exc)  # SQLAlchemy's names the statement
            raise StorageUnavailableError(
                backend.get(module, "The database"), action, reason or type(exc).__name__
            ) from exc

    @staticmethod
    def _backoff(attempt: int) -> None:
        # Jittered, growing pause so that writers contending for one instance stop colliding.
        time.sleep(random.uniform(0, 0.002 * (2 ** min(attempt, 6))))
