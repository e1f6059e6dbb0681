"""AES-GCM nonces of the users' keys: never repeated across threads and forked processes, drawn
without a system call per nonce (which would hand the GIL away in the middle of each command)."""

from __future__ import annotations

import os
import threading
from unittest import mock

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from flowstore import keys
from flowstore.keys import SealedKey


def _key() -> SealedKey:
    return SealedKey("subject", AESGCM(AESGCM.generate_key(256)))


def test_sealing_makes_no_system_call_for_its_nonce() -> None:
    key = _key()
    with mock.patch.object(keys.os, "urandom", side_effect=AssertionError("a system call")):
        sealed = [key.seal(b"same text", b"context") for _ in range(3)]
    assert len(set(sealed)) == 3  # a fresh nonce each time
    assert all(key.open(blob, b"context") == b"same text" for blob in sealed)


def test_threads_never_get_the_same_nonce() -> None:
    drawn: list[list[bytes]] = [[] for _ in range(4)]

    def draw(into: list[bytes]) -> None:
        into.extend(keys._nonce() for _ in range(5000))

    threads = [threading.Thread(target=draw, args=(into,)) for into in drawn]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [nonce for into in drawn for nonce in into]
    assert len(set(every)) == len(every) == 20_000
    assert {len(nonce) for nonce in every} == {12}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork only")
def test_a_forked_child_does_not_continue_its_parents_nonces() -> None:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its first nonces, to the parent
        try:
            os.write(write, b"".join(keys._nonce() for _ in range(100)))
        finally:
            os._exit(0)
    os.close(write)
    parent = {keys._nonce() for _ in range(100)}
    with os.fdopen(read, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    child = {data[i : i + 12] for i in range(0, len(data), 12)}
    assert len(child) == 100
    assert parent.isdisjoint(child)  # without a re-seed at the fork, both go on from one counter
