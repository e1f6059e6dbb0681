"""`FlowStore`: the service. Commands append events; queries read aggregates and the log.

Every command on a user's flow follows one path (`_change_instance`): read the instance, decide the
events with a pure function from `flowstore.domain`, append them. A concurrent append to the same
instance makes the append fail on its version; the command then re-reads and decides again, so a
transition is always validated against the state it is applied to.
"""

from __future__ import annotations

import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar, cast
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.persistence import IntegrityError, InternalError, Mapper, Transcoder
from pydantic import ValidationError

from flowstore.codec import OrjsonTranscoder, PydanticMapper
from flowstore.definitions import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    FlowDefinition,
    check_payload,
    parse_definition,
    update_definition,
)
from flowstore.domain import (
    CATALOG_ID,
    Decision,
    DomainEvent,
    FlowCatalog,
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
    override_state,
    project,
    start_flow,
)
from flowstore.errors import (
    ConcurrencyConflictError,
    FlowError,
    FlowExistsError,
    FlowNotFoundError,
    FlowStateCorruptionError,
    FlowStateNotFoundError,
    InvalidArgumentError,
)
from flowstore.models import FlowState, FlowStateHistory, FlowStatistics, FlowStatus, FunnelStep
from flowstore.storage import StorageConfig, parse_url, resolve_url

if TYPE_CHECKING:
    from projections.sql import Difference

__all__ = ["FlowStore"]

T = TypeVar("T")

_MAX_ID_LENGTH = 256
_LOG_PAGE = 1000
_OPEN_ATTEMPTS = 5


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _require_id(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise InvalidArgumentError(name, value, f"must be a string, not {type(value).__name__}")
    if not value.strip():
        raise InvalidArgumentError(name, value, "must not be empty")
    if len(value) > _MAX_ID_LENGTH:
        raise InvalidArgumentError(name, value[:40] + "...", f"longer than {_MAX_ID_LENGTH}")
    return value


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

    With `live_projections` (the default) every command also brings the read-model tables up to date
    before it returns, so table queries read your writes; without it, a separate worker does that.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
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
        self._instances: OrderedDict[UUID, FlowInstance] = OrderedDict()
        self._definitions: dict[str, tuple[FlowVersions, float]] = {}
        self._clock = clock
        env = {
            **self.config.env,
            "AGGREGATE_CACHE_MAXSIZE": str(cache_size),
            # Aggregates are frozen pydantic models: a cached one cannot be corrupted by a caller,
            # so the repository need not deep-copy it on every read.
            "DEEPCOPY_FROM_AGGREGATE_CACHE": "n",
        }
        self._app = self._open(env)
        # Imported here, not at the top: projections import the domain, and the domain package
        # must stay importable without SQLAlchemy (see tests/test_package.py).
        from projections.sql import SqlProjections

        self._projections = SqlProjections(self.config)
        self.live_projections = live_projections
        self._catch_up()

    # Lifecycle

    @staticmethod
    def _open(env: dict[str, str]) -> _FlowApplication:
        # Processes starting together on one PostgreSQL database race on CREATE TABLE IF NOT EXISTS
        # ("tuple concurrently updated", or a unique violation in pg_type); the loser just retries.
        for attempt in range(_OPEN_ATTEMPTS):
            try:
                return _FlowApplication(env=env)
            except (InternalError, IntegrityError):
                if attempt == _OPEN_ATTEMPTS - 1:
                    raise
                FlowStore._backoff(attempt)
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Release database connections. The store cannot be used afterwards."""
        self._projections.close()
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
            self._app.save(*events)
        except IntegrityError:
            for iid in seen:
                self._forget_instance(iid)
            return [self._one(*request) for request in batch]
        for instance in seen.values():
            if instance is not None:
                self._remember_instance(instance)
        self._catch_up()
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
        for user_id, flow_id in self._projections.expired(now):
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
        for row in self._projections.user_flows(user_id):
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
        rows = self._projections.history(user_id, flow_id)
        if not rows:
            self._get_versions(flow_id)  # unknown flow -> FlowNotFoundError
        return rows

    def get_flow_statistics(self, flow_id: str | None = None) -> FlowStatistics:
        """Usage and performance of one flow, or of all flows (read from the statistics tables)."""
        if flow_id is not None:
            self._get_versions(flow_id)
        return self._projections.statistics(
            flow_id, now=self._clock(), window=self.statistics_window
        )

    def get_flow_funnel(self, flow_id: str) -> list[FunnelStep]:
        """Per step of the flow: entered, moved on, dropped, and active there now."""
        definition = self._get_versions(flow_id).latest
        found = {step.step: step for step in self._projections.funnel(flow_id)}
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
        self._projections.recover(
            (user_id, flow_id),
            lambda: cast(list[DomainEvent], list(self._app.events.get(iid))),
            self.read_events,
        )
        return self.get_flow_state(user_id, flow_id)

    def rebuild_projections(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Replay the whole log into fresh tables and swap them in; return the events replayed."""
        return self._projections.rebuild(self.read_events, progress=progress)

    def verify_projections(self) -> list[Difference]:
        """Every difference between the tables and the log (empty when they agree)."""
        return self._projections.verify(self.read_events)

    def repair_projections(
        self, user_id: str | None = None, flow_id: str | None = None
    ) -> list[Difference]:
        """Rewrite exactly the rows that differ from the log; return what was repaired."""
        return self._projections.repair(self.read_events, user_id=user_id, flow_id=flow_id)

    def catch_up_projections(self, batch: int = 1000) -> int:
        """Apply events the tables have not seen yet, `batch` per transaction; return the position."""
        return self._projections.catch_up(self.read_events, page=batch)

    def projection_position(self) -> int:
        """The notification id of the last event the tables reflect."""
        return self._projections.position()

    def read_events(self, start: int, limit: int = 1000) -> list[tuple[int, DomainEvent]]:
        """Up to `limit` events of the log from notification id `start` on: (id, event) pairs.

        Ids increase in commit order (they may have gaps); page with `start = last_id + 1`. This is
        the stream publishers, pushers and auditors follow.
        """
        page = self._app.recorder.select_notifications(start, limit)
        to_event = self._app.mapper.to_domain_event
        return [(n.id, cast(DomainEvent, to_event(n))) for n in page]

    def import_events(self, events: Iterable[DomainEvent], *, batch: int = 500) -> int:
        """Append events recorded elsewhere (a restore), as they are: same ids, versions, times.

        Each aggregate's events must come in version order without duplicates; an event whose
        version is already taken raises `ConcurrencyConflictError` and its batch is not written.
        Returns how many events were appended; projections are brought up to date at the end.
        """
        pending: list[DomainEvent] = []
        appended = 0

        def flush() -> None:
            nonlocal appended
            try:
                self._app.save(*pending)
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
            pending.append(event)
            if len(pending) >= batch:
                flush()
        if pending:
            flush()
        self._catch_up()
        return appended

    def log_position(self) -> int:
        """The notification id of the newest event in the log (0 when the log is empty)."""
        return self._app.recorder.max_notification_id() or 0

    # Internals

    def _catch_up(self) -> None:
        # With live projections off, a worker (`flowstore projections run`) keeps the tables current.
        if self.live_projections:
            self._projections.catch_up(self.read_events)

    def _get(self, aggregate_id: UUID, kind: type[T]) -> T | None:
        try:
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
                self._app.save(*decision.events)
            except IntegrityError:
                self._forget_instance(iid)
                self._backoff(attempt)
                continue
            self._catch_up()  # read-your-writes for the table queries
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
            events = decide()
            try:
                self._app.save(*events)
            except IntegrityError:
                self._backoff(attempt)
                continue
            self._definitions.pop(flow_id, None)
            self._catch_up()
            return
        raise ConcurrencyConflictError(user_id, flow_id, self.max_retries)

    @staticmethod
    def _backoff(attempt: int) -> None:
        # Jittered, growing pause so that writers contending for one instance stop colliding.
        time.sleep(random.uniform(0, 0.002 * (2 ** min(attempt, 6))))
