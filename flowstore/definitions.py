"""Flow definitions: the steps a user walks through and the transitions between them.

The models accept the seed's JSON exactly as written (camelCase keys) and dump back to it. Parsing
checks the whole definition and reports every problem at once in one `DefinitionError`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError
from pydantic.alias_generators import to_camel

from flowstore.errors import DefinitionError
from flowstore.inputs import (
    MAX_JSON_DEPTH,
    MAX_NAME_LENGTH,
    encode_json,
    has_control_characters,
    json_nesting,
)
from flowstore.schemas import PayloadSchema, schema_problems

__all__ = [
    "DOT_IDS",
    "MAX_DEFINITION_BYTES",
    "MAX_TTL_SECONDS",
    "FlowDefinition",
    "FlowStep",
    "FlowTransition",
    "flow_warnings",
    "parse_definition",
    "reachable_steps",
    "update_definition",
    "validate_flow",
]

MAX_DEFINITION_BYTES = 256 * 1024
"""Largest definition accepted, in bytes of its orjson encoding (as its `FlowDefined` event stores it).

A definition travels as one event: one row appended to the log and one Kafka message. A quarter of
Kafka's default 1 MB message limit (`max_request_size`) leaves room for the event's envelope; far
larger events also hung PostgreSQL writers (megabytes in one psycopg pipeline). Real flows need a
few kilobytes.
"""

DOT_IDS = frozenset({".", ".."})
"""Flow ids that are path segments of their own in a URL (`/flows/..` is `/`): refused, as is `/`
(flow ids are one segment of every REST path and per-flow remote URL)."""

MAX_TTL_SECONDS = 100 * 365 * 24 * 60 * 60
"""Longest ttl (100 years): the expiry, now + ttl, must stay a date (before year 10000)."""


class _SeedModel(BaseModel):
    """Frozen, camelCase on the wire, snake_case in Python; unknown keys are typos, not data."""

    model_config = ConfigDict(
        frozen=True, alias_generator=to_camel, populate_by_name=True, extra="forbid"
    )

    def to_seed(self) -> dict[str, Any]:
        """The model in the seed's JSON shape (camelCase keys, unset optional fields left out)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class FlowTransition(_SeedModel):
    """An edge: taking `transition` from its step moves the user to `step`."""

    transition: str
    """The transition's name as written; normally its key in `transitions`, which is what names it."""
    step: str
    explicit: bool | None = None
    """The user chooses this transition among the step's options; `advance` does not take it."""
    reversible: bool | None = None
    """The user may go back: taking it keeps the step left as the state's `previous`."""
    payload_schema: dict[str, Any] | None = None
    _validator: Any = PrivateAttr(default=None)

    def payload_problem(self, payload: Any) -> str | None:
        """The first reason the payload fails this transition's JSON Schema, or None."""
        if self.payload_schema is None:
            return None
        if self._validator is None:
            # Built once per transition object: definitions are immutable and cached by version.
            self._validator = PayloadSchema(self.payload_schema)
        problem: str | None = self._validator.problem(payload)
        return problem


class FlowStep(_SeedModel):
    """A node: where the user is, which service and module render it, and where they can go."""

    index: int
    step: str
    service: str
    path: str | None = None
    module: str | None = None
    initial: bool | None = None
    """The step may be entered directly (`reset_flow` to it), as well as the initial step."""
    payload_map: dict[str, int] | None = None
    """Which payload values a state token carries at this step: {payload key: position in `p`}."""
    transitions: dict[str, FlowTransition] = Field(default_factory=dict)

    @property
    def is_terminal(self) -> bool:
        """A step without transitions ends the flow; reaching it completes the instance."""
        return not self.transitions


class FlowDefinition(_SeedModel):
    """A versioned flow: its steps, its initial step and the seed's free-form config and prefabs."""

    flow: str
    initial_step: str
    steps: dict[str, FlowStep]
    config: dict[str, Any] | None = None
    """Free-form (`queryParam`, `services`, `modules`, `pathes`, `defaultFlow`); may be absent."""
    prefabs: dict[str, Any] | None = None
    ttl: int | None = None
    """Seconds an unfinished instance may stay idle before `purge_expired_flows` expires it."""
    version: int | None = None
    """Set by the store on definitions it returns; ignored on input."""

    def step(self, name: str) -> FlowStep | None:
        """The step called `name`, or None."""
        return self.steps.get(name)

    def entry_steps(self) -> list[str]:
        """The steps a run may start at: `initialStep` and every step marked `initial`."""
        return [self.initial_step] + [
            name for name, step in self.steps.items() if step.initial and name != self.initial_step
        ]

    def may_enter(self, name: str) -> bool:
        """Whether a run may start at step `name`: any step unless some are marked `initial`."""
        if name not in self.steps:
            return False
        if not any(step.initial for step in self.steps.values()):
            return True
        return name in self.entry_steps()


_UPDATABLE = set(FlowDefinition.model_fields) - {"version"}


def _shown(name: str) -> str:
    """A name short enough to quote in a message."""
    return name if len(name) <= MAX_NAME_LENGTH else name[:40] + "..."


def _name_problems(definition: FlowDefinition) -> list[str]:
    # Empty flow, step and transition names are reported in `_problems`, where they are found.
    names = [("flow id", definition.flow)]
    for key, step in definition.steps.items():
        names += [("step name", key), ("service", step.service), ("module", step.module or "")]
        names += [("transition name", t) for t in step.transitions]
        # A `transition` field may differ from its key (kept as given): it must be a name too.
        names += [
            ("transition name", t.transition)
            for key, t in step.transitions.items()
            if t.transition != key
        ]
    problems = []
    for kind, name in names:
        if len(name) > MAX_NAME_LENGTH:
            problems.append(
                f"{kind} {_shown(name)!r} is longer than {MAX_NAME_LENGTH} characters ({len(name)})"
            )
        if has_control_characters(name):
            problems.append(f"{kind} {_shown(name)!r} contains a control character")
    if definition.flow in DOT_IDS or "/" in definition.flow:
        problems.append(f"flow id {definition.flow!r} must not be '.', '..' or contain '/'")
    problems.extend(
        f"service of step {key!r} must not be empty"
        for key, step in definition.steps.items()
        if not step.service.strip()
    )
    return problems


def _storage_problems(definition: FlowDefinition) -> list[str]:
    # What the validation above cannot see but storing it would trip on: a definition is one event,
    # encoded by orjson like any other (see flowstore.codec), so it must be plain, small JSON.
    data = definition.model_dump()
    try:
        encoded = encode_json(data)
    except ValueError as exc:
        return [f"the definition cannot be stored as JSON: {exc}"]
    if len(encoded) > MAX_DEFINITION_BYTES:
        return [
            f"the definition is {len(encoded)} bytes as JSON, over the limit of "
            f"{MAX_DEFINITION_BYTES} bytes"
        ]
    depth = json_nesting(data)
    if depth > MAX_JSON_DEPTH:
        return [f"the definition is nested {depth} levels deep, over the limit of {MAX_JSON_DEPTH}"]
    return []


def _problems(definition: FlowDefinition) -> list[str]:
    problems: list[str] = _name_problems(definition)
    if not definition.flow.strip():
        problems.append("flow id must not be empty")
    if not definition.steps:
        problems.append("steps must not be empty")
    elif definition.initial_step is not None and definition.initial_step not in definition.steps:
        problems.append(f"initialStep {definition.initial_step!r} is not a step")
    names = Counter(step.step for step in definition.steps.values())
    problems.extend(f"step name {name!r} is used {n} times" for name, n in names.items() if n > 1)
    # None: an index that is not an integer, already reported with the definition's shape.
    indexes = Counter(step.index for step in definition.steps.values() if step.index is not None)
    problems.extend(f"step index {i} is used {n} times" for i, n in indexes.items() if n > 1)
    for key, step in definition.steps.items():
        if not key.strip():
            problems.append("a step has an empty name")
        if step.step != key:
            problems.append(f"step {key!r} says its name is {step.step!r}")
        for tkey, transition in step.transitions.items():
            if not tkey.strip():
                problems.append(f"step {key!r} has a transition with an empty name")
            # The key names the transition; a differing `transition` field is kept as given
            # (the real `_oidp` flow has `"denied": {"transition": "link-id", ...}`).
            if transition.step is not None and transition.step not in definition.steps:
                problems.append(
                    f"transition {tkey!r} of step {key!r} targets unknown step {transition.step!r}"
                )
            if transition.payload_schema is not None:
                problems.extend(
                    f"payloadSchema of transition {tkey!r} of step {key!r}: {problem}"
                    for problem in schema_problems(transition.payload_schema)
                )
    if definition.ttl is not None and definition.ttl <= 0:
        problems.append(f"ttl must be a positive number of seconds, not {definition.ttl}")
    elif definition.ttl is not None and definition.ttl > MAX_TTL_SECONDS:
        problems.append(
            f"ttl must be at most {MAX_TTL_SECONDS} seconds (100 years), not {definition.ttl}"
        )
    return problems


def reachable_steps(definition: FlowDefinition) -> list[str]:
    """The steps a user can reach from the entry steps (`initialStep` and every `initial` step, these
    included), in breadth-first order."""
    if definition.initial_step not in definition.steps:
        return []
    seen = definition.entry_steps()
    for name in seen:  # grows while iterating: a breadth-first walk without a separate queue
        for transition in definition.steps[name].transitions.values():
            if transition.step in definition.steps and transition.step not in seen:
                seen.append(transition.step)
    return seen


def flow_warnings(definition: FlowDefinition) -> list[str]:
    """What is legal but likely a mistake: steps no user can reach, and no reachable terminal step.

    A step no user can reach is dead weight at best and a typo at worst; a flow with no reachable
    terminal step never completes (every run ends by clear, reset or expiry), which is right for a
    subscription that loops forever and wrong for a wizard: so warnings, not errors.
    """
    reachable = reachable_steps(definition)
    if not reachable:
        return []
    entries = definition.entry_steps()
    if len(entries) == 1:
        source, terminal_source = f"initialStep {entries[0]!r}", repr(entries[0])
    else:
        source = terminal_source = "the entry steps " + ", ".join(repr(n) for n in entries)
    problems = [
        f"step {name!r} is not reachable from {source}"
        for name in definition.steps
        if name not in reachable
    ]
    if not any(definition.steps[name].is_terminal for name in reachable):
        problems.append(
            f"no terminal step (one without transitions) is reachable from {terminal_source}"
        )
    return problems


def parse_definition(data: FlowDefinition | Mapping[str, Any]) -> FlowDefinition:
    """Validate a definition (model or seed-shaped dict); raise `DefinitionError` listing all problems."""
    return _parse(data)


def validate_flow(data: FlowDefinition | Mapping[str, Any]) -> list[str]:
    """Check a definition: raise `DefinitionError` listing every problem; return the warnings.

    Warnings (`flow_warnings`) do not stop a definition from being stored: `flowstore flows load`
    prints them.
    """
    return flow_warnings(_parse(data))


def _parse(data: FlowDefinition | Mapping[str, Any]) -> FlowDefinition:
    if isinstance(data, FlowDefinition):
        try:
            raw: Any = data.to_seed()
        except ValueError as exc:  # pydantic: nested too deep, or a value without a JSON form
            raise DefinitionError(_shown(data.flow), [f"not JSON: {exc}"]) from None
    else:
        raw = data
    if not isinstance(raw, Mapping):
        raise DefinitionError(
            None, [f"a definition must be a JSON object, not {type(raw).__name__}"]
        )
    flow_id = _shown(raw["flow"]) if isinstance(raw.get("flow"), str) else None
    try:
        definition = FlowDefinition.model_validate({k: v for k, v in raw.items() if k != "version"})
    except ValidationError as exc:
        problems = [
            f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}"
            for err in exc.errors()
        ]
        # The shape is wrong somewhere, but every other problem is listed too: the meaning of
        # whatever parts have the right shape is checked on a lenient reading of the same data.
        problems += [p for p in _problems(_lenient(raw)) if p not in problems]
        raise DefinitionError(flow_id, problems) from None
    problems = _problems(definition) + _storage_problems(definition)
    if problems:
        raise DefinitionError(_shown(definition.flow), problems)
    return definition


def _text(value: Any, default: Any) -> Any:
    return value if isinstance(value, str) else default


def _integer(value: Any) -> Any:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _lenient(raw: Mapping[str, Any]) -> FlowDefinition:
    """The parts of a malformed definition that have the right shape, unvalidated.

    A wrong or missing value becomes a neutral stand-in (None, or a name the checks accept), so
    that `_problems` reports only what is wrong with the meaning, never the shape again.
    """

    def get(data: Mapping[str, Any], name: str, alias: str) -> Any:
        return data.get(alias, data.get(name))

    def mapping(value: Any) -> Mapping[Any, Any]:
        return value if isinstance(value, Mapping) else {}

    steps = {}
    for key, step in mapping(raw.get("steps")).items():
        if not isinstance(key, str) or not isinstance(step, Mapping):
            continue
        transitions = {}
        for tkey, transition in mapping(step.get("transitions")).items():
            if not isinstance(tkey, str) or not isinstance(transition, Mapping):
                continue
            schema = get(transition, "payload_schema", "payloadSchema")
            transitions[tkey] = FlowTransition.model_construct(
                transition=_text(transition.get("transition"), tkey),
                step=_text(transition.get("step"), None),
                payload_schema=schema if isinstance(schema, dict) else None,
            )
        steps[key] = FlowStep.model_construct(
            index=_integer(step.get("index")),
            step=_text(step.get("step"), key),
            service=_text(step.get("service"), "service"),
            module=_text(step.get("module"), None),
            transitions=transitions,
        )
    return FlowDefinition.model_construct(
        flow=_text(raw.get("flow"), "flow"),
        initial_step=_text(get(raw, "initial_step", "initialStep"), None),
        steps=steps,
        ttl=_integer(raw.get("ttl")),
    )


def update_definition(current: FlowDefinition, changes: Mapping[str, Any]) -> FlowDefinition:
    """The definition with the given top-level keys replaced whole (camelCase or snake_case keys)."""
    if not isinstance(changes, Mapping):
        raise DefinitionError(current.flow, ["changes must be a JSON object"])
    aliases = {f: FlowDefinition.model_fields[f].alias or f for f in _UPDATABLE}
    known = set(aliases) | set(aliases.values())
    merged = current.to_seed()
    merged.pop("version", None)
    problems = []
    for key, value in changes.items():
        if key not in known:
            problems.append(f"{key!r} is not a definition field")
        elif aliases.get(key, key) == "flow" and value != current.flow:
            problems.append(f"flow id cannot change (from {current.flow!r} to {value!r})")
        else:
            # Replace the whole top-level key; remove it when set to None (back to its default).
            alias = aliases.get(key, key)
            merged.pop(alias, None)
            if value is not None:
                merged[alias] = value
    if problems:
        raise DefinitionError(current.flow, problems)
    return parse_definition(merged)
