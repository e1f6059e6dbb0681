"""Instance ids: remembered (issue 17), yet the same ids every log already holds."""

from __future__ import annotations

from uuid import UUID, uuid5

from hypothesis import example, given
from hypothesis import strategies as st

from flowstore.domain import _NAMESPACE, _instance_id, instance_id
from flowstore.inputs import has_control_characters

# What `require_id` lets through: no control characters (the separator among them) or surrogates.
ids = st.text(
    st.characters(exclude_categories=("Cc", "Cs")), min_size=1, max_size=20
).filter(lambda text: not has_control_characters(text))


def test_an_instance_id_is_the_one_earlier_versions_wrote():
    # Logs on disk name instances by these ids: a cache must not change a single one.
    assert instance_id("ann", "checkout") == UUID("6e430fd9-6d4d-571b-ae28-193d082989c3")


@given(ids, ids)
def test_a_remembered_id_is_the_one_computed_afresh(user_id: str, flow_id: str) -> None:
    first = instance_id(user_id, flow_id)
    _instance_id.cache_clear()
    assert instance_id(user_id, flow_id) == first == uuid5(
        _NAMESPACE, f"instance\x1f{user_id}\x1f{flow_id}"
    )


@given(ids, ids, ids, ids)
@example("a:b", "c", "a", "b:c")
def test_different_users_or_flows_have_different_instances(
    user: str, flow: str, other_user: str, other_flow: str
) -> None:
    same = (user, flow) == (other_user, other_flow)
    assert (instance_id(user, flow) == instance_id(other_user, other_flow)) == same
