"""The leader's lease setting: read from the environment, refused with a typed error when unusable."""

from __future__ import annotations

import pytest

from flowstore.errors import StorageConfigError
from flowstore.leader import DEFAULT_LEASE, LEASE_ENV, LeaderLock, _lease_settings, leader_lease
from flowstore.storage import parse_url


def test_the_lease_defaults_to_ten_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LEASE_ENV, raising=False)
    assert leader_lease() == DEFAULT_LEASE == 10.0


def test_the_lease_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LEASE_ENV, "2.5")
    assert leader_lease() == 2.5
    assert LeaderLock(parse_url("memory://"), "job", store_key="lease").lease == 2.5


@pytest.mark.parametrize("text", ["soon", "0", "-3", "0.5", "nan", "inf", "3601"])
def test_an_unusable_lease_is_a_storage_config_error(
    monkeypatch: pytest.MonkeyPatch, text: str
) -> None:
    monkeypatch.setenv(LEASE_ENV, text)
    with pytest.raises(StorageConfigError, match=LEASE_ENV):
        leader_lease()


def test_the_server_ends_a_session_silent_for_a_lease_and_keepalives_scale_with_it() -> None:
    settings = _lease_settings(10)
    assert "-c idle_session_timeout=10000" in settings["options"]
    assert "-c tcp_user_timeout=10000" in settings["options"]
    # idle 5 s, then 3 probes 2 s apart: about 11 s, as before the lease.
    assert (settings["keepalives_idle"], settings["keepalives_interval"]) == (5, 2)
    assert settings["keepalives_count"] == 3
