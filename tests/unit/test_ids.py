"""Instance ids: remembered (issue 17), yet the same ids every log already holds."""

from __future__ import annotations

import enum
from uuid import UUID, uuid5

from hypothesis import example, given
from hypothesis import strategies as st

from flowstore.domain import _NAMESPACE, _instance_id, instance_id
from flowstore.errors import InvalidArgumentError
from flowstore.inputs import require_id


def _usable(text: str) -> bool:
    try:
        require_id(text, "user_id")
    except InvalidArgumentError:
        return False
    return True


# The ids commands and reads accept (no control characters, the separator among them).
ids = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=20).filter(_usable)


def _written(user_id: str, flow_id: str) -> UUID:
    """The id as every version has written it into logs."""
    return uuid5(_NAMESPACE, f"instance\x1f{user_id}\x1f{flow_id}")


def test_an_instance_id_is_the_one_earlier_versions_wrote() -> None:
    # Logs on disk name instances by these ids: a cache must not change a single one.
    assert instance_id("ann", "checkout") == UUID("6e430fd9-6d4d-571b-ae28-193d082989c3")


@given(ids, ids)
def test_an_id_is_the_written_one_when_made_and_when_remembered(user_id: str, flow_id: str) -> None:
    _instance_id.cache_clear()
    made = instance_id(user_id, flow_id)
    remembered = instance_id(user_id, flow_id)
    assert _instance_id.cache_info().hits == 1
    assert made == remembered == _written(user_id, flow_id)
    # The neighbours remembered beside it keep their own ids.
    assert instance_id(user_id, flow_id + "x") == _written(user_id, flow_id + "x")
    assert instance_id(user_id + "x", flow_id) == _written(user_id + "x", flow_id)


@given(ids, ids, ids, ids)
@example("a:b", "c", "a", "b:c")
@example("ann", "a", "ann", "b")
@example("ann", "a", "bob", "a")
def test_different_users_or_flows_have_different_instances(
    user: str, flow: str, other_user: str, other_flow: str
) -> None:
    same = (user, flow) == (other_user, other_flow)
    assert (instance_id(user, flow) == instance_id(other_user, other_flow)) == same


# Not a StrEnum: a (str, Enum) member formats as "_Users.ANN", not as its value.
class _Users(str, enum.Enum):  # noqa: UP042
    ANN = "ann"


def test_a_str_subclass_equal_to_an_id_has_that_id_whichever_comes_first() -> None:
    # Equal strings are one cache key, so they must make one id; the events of a command given
    # the member hold "ann" (pydantic validates it to its value), so that id is ann's.
    for first, then in ((_Users.ANN, "ann"), ("ann", _Users.ANN)):
        _instance_id.cache_clear()
        assert instance_id(first, "checkout") == instance_id(then, "checkout")
        assert instance_id(then, "checkout") == _written("ann", "checkout")
