"""Erasure of one user by crypto-shredding: a key per user, deleted; the log stays append-only.

Checked on the raw tables (no plaintext of a user's personal fields anywhere in the log; after the
erasure none of the remaining keys opens the user's sealed fields) and through every query.
"""

from __future__ import annotations

import base64
import threading
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import create_engine, text

from flowstore import (
    FlowError,
    FlowStore,
    InvalidArgumentError,
    InvalidTransitionError,
    ProjectionLayoutError,
)
from flowstore.adapters.cli import main
from flowstore.domain import FlowErased, instance_id
from flowstore.keys import ERASED_USER_PREFIX
from flowstore.storage import parse_url
from flowstore.testing import Internals
from tests.flows import linear, onboarding, ring
from tests.integration.test_encryption import new_key, raw_event_states

FLOW = "user-onboarding"
ANN_SECRET = "ann-secret-4c1e"
BOB_SECRET = "bob-secret-9d2f"


def populate(store: FlowStore) -> None:
    """Ann in two flows (with a payload and a rejected attempt), Bob in one."""
    store.create_flow(onboarding())
    store.create_flow(linear("other"))
    store.execute_transition("ann", FLOW, "start", {"note": ANN_SECRET})
    with pytest.raises(InvalidTransitionError):
        store.execute_transition("ann", FLOW, "no-such-edge", {"note": ANN_SECRET})
    store.execute_transition("ann", "other", "next", {"note": ANN_SECRET})
    store.execute_transition("bob", FLOW, "start", {"note": BOB_SECRET})


def sealed_blobs(url: str) -> list[tuple[bytes, dict[str, Any]]]:
    """(instance id + version context, stored state) of every sealed event, from the raw table."""
    config = parse_url(url)
    assert config.sqlalchemy_url is not None
    engine = create_engine(config.sqlalchemy_url)
    table = "stored_events" if config.backend == "sqlite" else "flowstore_events"
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text(f"SELECT originator_id, originator_version, state FROM {table}")
            ).all()
    finally:
        engine.dispose()
    found = []
    for originator_id, version, state in rows:
        decoded = orjson.loads(bytes(state))
        if "sealed" in decoded:
            uuid = originator_id if config.backend != "sqlite" else _uuid(originator_id)
            found.append((uuid.bytes + int(version).to_bytes(8, "big"), decoded))
    return found


def _uuid(value: Any) -> Any:
    from uuid import UUID

    return UUID(str(value))


def raw_keys(url: str) -> list[bytes]:
    config = parse_url(url)
    assert config.sqlalchemy_url is not None
    engine = create_engine(config.sqlalchemy_url)
    try:
        with engine.connect() as conn:
            return [bytes(k) for (k,) in conn.execute(text("SELECT key FROM flowstore_user_keys"))]
    finally:
        engine.dispose()


def opens(blob: tuple[bytes, dict[str, Any]], key: bytes) -> bool:
    context, state = blob
    sealed = base64.b64decode(state["sealed"])
    try:
        AESGCM(key).decrypt(sealed[:12], sealed[12:], context)
    except Exception:
        return False
    return True


def test_personal_fields_are_sealed_per_user_in_the_log(store_url: str) -> None:
    with FlowStore(store_url) as store:
        populate(store)
    states = raw_event_states(store_url)
    assert any(b"user-onboarding" in s for s in states)  # definitions are not personal
    for secret in (ANN_SECRET, BOB_SECRET, "ann", "bob"):
        assert not any(secret.encode() in s for s in states), secret
    blobs = sealed_blobs(store_url)
    keys = raw_keys(store_url)
    assert len(keys) == 2  # one per user
    # Every sealed blob opens with exactly one key: its user's.
    assert all(sum(opens(blob, key) for key in keys) == 1 for blob in blobs)


def test_erase_user_leaves_nothing_of_them_and_everything_of_others(store_url: str) -> None:
    with FlowStore(store_url) as store:
        populate(store)
        bob_before = (store.get_flow_state("bob", FLOW), store.get_flow_history("bob", FLOW))
        stats_before = store.get_flow_statistics(FLOW)
        ann_blobs = [b for b in sealed_blobs(store_url) if b[0][:16] in _ann_instances()]
        assert ann_blobs
        position = store.log_position()

        assert store.erase_user("ann") == 2

        # Append-only: two erasure events, nothing rewritten.
        new = [e for _, e in store.read_events(position + 1)]
        assert [type(e) for e in new] == [FlowErased, FlowErased]
        for flow in (FLOW, "other"):
            assert store.get_flow_state("ann", flow) is None
            assert store.get_flow_history("ann", flow) == []
        assert store.get_user_flows("ann") == []
        assert (store.get_flow_state("bob", FLOW), store.get_flow_history("bob", FLOW)) == (
            bob_before
        )
        # The statistics keep their anonymous counts.
        stats = store.get_flow_statistics(FLOW)
        assert (stats.total_flows, stats.error_rate) == (
            stats_before.total_flows,
            stats_before.error_rate,
        )
        assert stats.active_users == stats_before.active_users - 1
        # No remaining key opens any of Ann's sealed fields; Bob's still open.
        keys = raw_keys(store_url)
        assert len(keys) == 1
        assert not any(opens(blob, key) for blob in ann_blobs for key in keys)
        # The log reads anonymised; the tables agree with a replay of it, and with a rebuild.
        events = [e for _, e in store.read_events(1, 10_000)]
        texts = orjson.dumps([e.model_dump(mode="json") for e in events]).decode()
        assert ANN_SECRET not in texts
        assert '"ann"' not in texts
        assert BOB_SECRET in texts
        erased_ids = {getattr(e, "user_id", "") for e in events} - {"bob", ""}
        assert erased_ids
        assert all(u.startswith(ERASED_USER_PREFIX) for u in erased_ids)
        assert store.verify_projections() == []
        live = store.read_model().snapshot()
        store.rebuild_projections()
        assert store.read_model().compare(live, store.read_model().snapshot()) == []
        assert store.recover_flow_state("ann", FLOW) is None

    with FlowStore(store_url) as reopened:  # nothing cached: everything from the log
        assert reopened.get_flow_state("ann", FLOW) is None
        assert reopened.get_flow_state("bob", FLOW) == bob_before[0]
        assert reopened.erase_user("ann") == 0  # already erased


def _ann_instances() -> set[bytes]:
    return {instance_id("ann", FLOW).bytes, instance_id("ann", "other").bytes}


def test_an_erased_user_id_can_come_back_with_a_new_key(store_url: str) -> None:
    with FlowStore(store_url) as store:
        populate(store)
        store.erase_user("ann")
        state = store.execute_transition("ann", FLOW, "start", {"note": "new"})
        assert (state.user_id, state.step, state.payload) == (
            "ann",
            "profile-setup",
            {"note": "new"},
        )
        assert [h.kind for h in store.get_flow_history("ann", FLOW)] == ["start", "transition"]
        assert [h.payload for h in store.get_flow_history("ann", FLOW)] == [None, {"note": "new"}]
        assert store.verify_projections() == []
        assert store.erase_user("ann") == 1
        assert store.get_flow_state("ann", FLOW) is None
        assert store.verify_projections() == []


def test_erasing_is_refused_for_a_bad_id_and_harmless_for_an_unknown_one(store_url: str) -> None:
    with FlowStore(store_url) as store:
        populate(store)
        position = store.log_position()
        with pytest.raises(InvalidArgumentError):
            store.erase_user("")
        assert store.erase_user("nobody") == 0
        assert store.log_position() == position


def test_with_a_cipher_key_the_users_keys_are_wrapped(store_url: str) -> None:
    key = new_key()
    with FlowStore(store_url, cipher_key=key) as store:
        populate(store)
    stored = raw_keys(store_url)
    assert len(stored) == 2
    assert all(len(k) != 32 for k in stored)  # wrapped: nonce + tag + key, not a bare AES key
    with FlowStore(store_url, cipher_key=key) as store:
        assert store.get_flow_state("ann", FLOW) is not None
        store.erase_user("ann")
        assert store.get_flow_state("ann", FLOW) is None
        assert store.get_flow_state("bob", FLOW) is not None


def test_erase_user_from_the_command_line(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path}/cli.db"
    with FlowStore(url) as store:
        populate(store)
    assert main(["--url", url, "--json", "erase-user", "ann"]) == 0
    assert orjson.loads(capsys.readouterr().out) == {"userId": "ann", "erasedInstances": 2}
    with FlowStore(url) as store:
        assert store.get_user_flows("ann") == []
        assert store.get_flow_state("bob", FLOW) is not None


def test_an_interrupted_erasure_is_finished_by_erasing_again(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FlowStore(store_url) as store:
        populate(store)

        def crash(user_id: str) -> list[str]:
            raise RuntimeError("killed before the key was deleted")

        monkeypatch.setattr(Internals(store).keys, "shred", crash)
        with pytest.raises(RuntimeError):
            store.erase_user("ann")
        monkeypatch.undo()
        assert store.get_flow_state("ann", FLOW) is None  # the erasure events are in
        assert len(raw_keys(store_url)) == 2  # but the key survived the crash
        assert store.erase_user("ann") == 0  # nothing left to append: only the key to delete
        assert len(raw_keys(store_url)) == 1
        assert all(not getattr(e, "user_id", "").startswith("ann") for _, e in store.read_events(1))


def test_a_store_that_last_saw_the_user_erased_erases_their_new_run(store_url: str) -> None:
    # definition_refresh=0: the serving store caches no keys (as if it came back after a while).
    with FlowStore(store_url, definition_refresh=0) as serving, FlowStore(store_url) as admin:
        populate(serving)
        assert admin.erase_user("ann") == 2
        serving.execute_transition("ann", FLOW, "start", {"note": "second run"})
        # The admin store's cache still has Ann's instance erased: it must read the log.
        assert admin.erase_user("ann") == 1
        assert admin.get_flow_state("ann", FLOW) is None
        assert admin.get_user_flows("ann") == []
        assert admin.verify_projections() == []
    with FlowStore(store_url) as fresh:
        assert fresh.get_flow_state("ann", FLOW) is None
        assert fresh.verify_projections() == []


def test_a_restore_of_a_user_erased_in_two_flows_keeps_nothing_of_them(store_url: str) -> None:
    with FlowStore("memory://") as source:
        populate(source)
        published = [e for _, e in source.read_events(1, 10_000)]  # sent before the erasure
        position = source.log_position()
        source.erase_user("ann")
        published += [e for _, e in source.read_events(position + 1)]  # the erasures, after it
    with FlowStore(store_url) as restored:
        restored.import_events(published)
        assert restored.get_user_flows("ann") == []
        for flow in (FLOW, "other"):
            assert restored.get_flow_state("ann", flow) is None
            assert restored.get_flow_history("ann", flow) == []
        assert restored.get_flow_state("bob", FLOW) is not None
        assert len(raw_keys(store_url)) == 1  # Bob's
        tables = repr(restored.read_model().snapshot())
        assert ANN_SECRET not in tables
        assert BOB_SECRET in tables
        assert restored.verify_projections() == []


def test_erased_is_a_reserved_prefix_for_user_ids() -> None:
    with FlowStore("memory://") as store:
        store.create_flow(onboarding())
        with pytest.raises(InvalidArgumentError, match="erased"):
            store.execute_transition("erased:abc", FLOW, "start")


def test_tables_of_the_layout_before_erasure_are_migrated_from_the_log(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path}/old.db"
    with FlowStore(url) as store:
        populate(store)
        before = store.get_user_flows("ann")
    engine = create_engine(parse_url(url).sqlalchemy_url or "")
    with engine.begin() as conn:  # the layout before instance ids were stored
        conn.execute(text("DROP INDEX ix_flow_states_instance"))
        conn.execute(text("ALTER TABLE flow_states DROP COLUMN instance_id"))
    engine.dispose()
    with pytest.raises(ProjectionLayoutError, match="projections migrate"):
        FlowStore(url)  # opening never drops tables: an operator migrates them
    with FlowStore(url, live_projections=False) as upgrading:
        assert upgrading.migrate_projections() > 0
    with FlowStore(url) as reopened:
        assert reopened.get_user_flows("ann") == before
        assert reopened.verify_projections() == []
        assert reopened.erase_user("ann") == 2
        assert reopened.get_user_flows("ann") == []


def test_a_write_racing_an_erasure_is_never_sealed_with_the_shredded_key(store_url: str) -> None:
    # The writer has looked its key up and is about to append when the erasure runs. Before the
    # per-user lock, the erasure shredded the key in that gap: the write landed sealed with a
    # dead key (the user's later state read as "erased:...", or a key was made for the stand-in).
    with FlowStore(store_url) as store:
        store.create_flow(linear("line"))
        store.create_flow(linear("other"))
        store.execute_transition("ann", "line", "next", {"note": ANN_SECRET})
        keys = Internals(store).keys
        looked_up, shredded = threading.Event(), threading.Event()
        original_for_users, original_shred = keys.for_users, keys.shred
        eraser = threading.Thread(target=store.erase_user, args=("ann",))

        def for_users(user_ids: Any) -> Any:
            # The append's lookup: the keys it seals with (`EventLog.save`).
            found = original_for_users(user_ids)
            if "ann" in found and not looked_up.is_set():
                looked_up.set()
                eraser.start()
                # Old code: the erasure shreds the key now. Fixed: it waits for this write.
                shredded.wait(timeout=1.0)
            return found

        def shred(user_id: str) -> list[str]:
            subjects = original_shred(user_id)
            shredded.set()
            return subjects

        keys.for_users = for_users  # type: ignore[method-assign]
        keys.shred = shred  # type: ignore[method-assign]
        store.execute_transition("ann", "other", "next", {"note": ANN_SECRET})
        eraser.join(timeout=60)
        assert not eraser.is_alive()
        # The write came before the erasure, so the erasure took it too; nothing names a stand-in.
        assert store.get_flow_state("ann", "other") is None
        assert store.get_flow_history("ann", "other") == []
        assert store.verify_projections() == []
    assert raw_keys(store_url) == []


def test_erasure_racing_the_users_own_writes_leaves_the_tables_true(store_url: str) -> None:
    with FlowStore(store_url) as store:
        store.create_flow(ring("loop"))
        store.execute_transition("ann", "loop", "tick")
        stop = threading.Event()
        failures: list[BaseException] = []

        def write() -> None:
            while not stop.is_set():
                try:
                    store.execute_transition("ann", "loop", "tick", {"note": ANN_SECRET})
                except FlowError:
                    pass  # conflicts with the erasure are the writer's to retry
                except BaseException as exc:  # pragma: no cover (reported below)
                    failures.append(exc)
                    return

        writers = [threading.Thread(target=write) for _ in range(2)]
        for thread in writers:
            thread.start()
        try:
            for _ in range(6):
                store.erase_user("ann")  # never CONCURRENCY_CONFLICT, however busy the user is
        finally:
            stop.set()
            for thread in writers:
                thread.join(timeout=60)
        assert failures == []
        assert store.verify_projections() == []
        # Whatever was written after the last erasure reads as ann's, under her one live key.
        history = store.get_flow_history("ann", "loop")
        assert all(row.user_id == "ann" for row in history)
    assert len(raw_keys(store_url)) <= 1
