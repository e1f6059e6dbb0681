"""Encryption at rest: events are AES-GCM ciphertext in the event table; a wrong key refuses to open."""

from __future__ import annotations

import base64
import os

import pytest
from eventsourcing.cryptography import AESCipher
from sqlalchemy import create_engine, inspect, text

from flowstore import EncryptionKeyError, FlowStore
from flowstore.storage import parse_url
from tests.flows import onboarding

FLOW = "user-onboarding"
MARKER = "secret-marker-7f3a"


def new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def raw_event_states(url: str) -> list[bytes]:
    """Every stored event's state bytes, read with plain SQL from whatever table holds them."""
    config = parse_url(url)
    assert config.sqlalchemy_url is not None
    engine = create_engine(config.sqlalchemy_url)
    try:
        tables = [t for t in inspect(engine).get_table_names() if t.endswith("events")]
        assert tables, "no events table found"
        with engine.connect() as conn:
            return [
                bytes(row[0])
                for t in tables
                for row in conn.execute(text(f'SELECT state FROM "{t}"'))
            ]
    finally:
        engine.dispose()


def write_some(store: FlowStore) -> None:
    store.create_flow(onboarding())
    store.execute_transition("ann", FLOW, "start", {"note": MARKER})


def test_without_a_key_definitions_are_plaintext_and_payloads_sealed(store_url: str) -> None:
    with FlowStore(store_url) as store:
        write_some(store)
    states = raw_event_states(store_url)
    assert any(b"user-onboarding" in state for state in states)
    # Personal fields are sealed with the user's own key either way (tests/test_erasure.py).
    assert not any(MARKER.encode() in state or b"ann" in state for state in states)


def test_with_a_key_the_log_holds_no_plaintext(store_url: str) -> None:
    key = new_key()
    with FlowStore(store_url, cipher_key=key) as store:
        write_some(store)
    states = raw_event_states(store_url)
    assert len(states) == 4
    for state in states:
        assert MARKER.encode() not in state
        assert b"user-onboarding" not in state
        assert b"ann" not in state
    with FlowStore(store_url, cipher_key=key) as reopened:
        state = reopened.get_flow_state("ann", FLOW)
        assert state is not None
        assert state.payload == {"note": MARKER}


def test_a_wrong_or_missing_key_refuses_to_open(store_url: str) -> None:
    with FlowStore(store_url, cipher_key=new_key()) as store:
        write_some(store)
    with pytest.raises(EncryptionKeyError, match="does not match"):
        FlowStore(store_url, cipher_key=new_key())
    with pytest.raises(EncryptionKeyError, match="encrypted"):
        FlowStore(store_url)


def test_a_missing_key_is_refused_whatever_byte_the_ciphertext_begins_with(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A ciphertext begins with its random nonce: one log in 256 has a first event beginning
    # with `{`, which looked like plain (if corrupt) JSON, so a store without the key opened it
    # (and would have appended plaintext to an encrypted log). Found by a CI run of the test above.
    nonces = iter(range(1, 1_000_000))
    monkeypatch.setattr(
        AESCipher,
        "random_bytes",
        staticmethod(lambda n: b"{" + next(nonces).to_bytes(n - 1, "big")),
    )
    with FlowStore(store_url, cipher_key=new_key()) as store:
        write_some(store)
    assert all(state.startswith(b"{") for state in raw_event_states(store_url))
    with pytest.raises(EncryptionKeyError, match="encrypted"):
        FlowStore(store_url)


def test_the_key_comes_from_the_environment_when_the_store_is_built(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = new_key()
    import flowstore  # importing reads no key: only construction does

    monkeypatch.setenv("FLOWSTORE_CIPHER_KEY", key)
    with flowstore.FlowStore(store_url) as store:
        write_some(store)
    assert all(MARKER.encode() not in s for s in raw_event_states(store_url))
    monkeypatch.setenv("FLOWSTORE_CIPHER_KEY", new_key())
    with pytest.raises(EncryptionKeyError):
        FlowStore(store_url)
    with FlowStore(store_url, cipher_key=key) as store:  # an explicit key beats the environment
        assert store.get_flow_state("ann", FLOW) is not None


@pytest.mark.parametrize("key", ["not base64!", base64.b64encode(b"short").decode()])
def test_a_malformed_key_is_a_clear_error(key: str) -> None:
    with pytest.raises(EncryptionKeyError, match="base64 AES key"):
        FlowStore("memory://", cipher_key=key)
