"""Authentication and authorization: the JWT verifier, 401/403 on every endpoint, users kept apart."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from pathlib import Path

import httpx
import jwt
import pytest

from flowstore import FlowStore
from flowstore.adapters.http import (
    AuthConfigError,
    AuthenticationError,
    JwtVerifier,
    Principal,
    create_app,
)
from tests.e2e.http.conftest import ONBOARDING, SECRET, LiveServer, User, bearer, mint
from tests.e2e.http.security import (
    ADMIN_ROUTES,
    CROSS_USER_PROBES,
    USER_ROUTES,
    bad_credentials,
    call,
    escalation_tokens,
)
from tests.e2e.http.test_api import assert_problem
from tests.flows import linear

# The verifier


def test_a_valid_token_names_the_user_and_roles() -> None:
    principal = JwtVerifier(SECRET).verify(mint("u1", roles=["admin", "x"]))
    assert principal.user_id == "u1"
    assert principal.roles == {"admin", "x"}
    assert principal.is_admin
    assert principal.expires_at is not None


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (mint("u1", ttl=-120), "expired"),
        (mint("u1", key="another-secret-of-sufficient-length-123"), "invalid"),  # forged
        (mint("u1", algorithm="HS512"), "invalid"),  # an algorithm the server did not choose
        (jwt.encode({"sub": "u1", "exp": time.time() + 86_400}, "", algorithm="none"), "invalid"),
        (mint(None), "invalid"),  # no sub
        (mint(""), "invalid"),
        (mint("a\x00b"), "invalid"),  # control characters: no real id has them
        (
            jwt.encode({"sub": "u1", "exp": time.time() + 86_400, "roles": "admin"}, SECRET),
            "invalid",
        ),
        (jwt.encode({"sub": "u1"}, SECRET, algorithm="HS256"), "invalid"),  # no exp
        ("not.a.token", "invalid"),
        ("", "invalid"),
    ],
    ids=[
        "expired",
        "forged",
        "other-alg",
        "alg-none",
        "no-sub",
        "empty-sub",
        "nul-in-sub",
        "roles-not-list",
        "no-exp",
        "garbage",
        "empty",
    ],
)
def test_unacceptable_tokens_are_refused(token: str, reason: str) -> None:
    with pytest.raises(AuthenticationError) as caught:
        JwtVerifier(SECRET).verify(token)
    assert caught.value.reason == reason


def test_audience_and_issuer_are_checked_when_configured() -> None:
    verifier = JwtVerifier(SECRET, audience="flowstore", issuer="https://idp.example")
    good = mint("u1", aud="flowstore", iss="https://idp.example")
    assert verifier.verify(good).user_id == "u1"
    for bad in (mint("u1", aud="other", iss="https://idp.example"), mint("u1", aud="flowstore")):
        with pytest.raises(AuthenticationError):
            verifier.verify(bad)


def test_rs256_tokens_verify_with_the_public_key(rsa_keys: tuple[bytes, str]) -> None:
    private, public = rsa_keys
    verifier = JwtVerifier(public, algorithm="RS256")
    assert verifier.verify(mint("u1", key=private, algorithm="RS256")).user_id == "u1"

    # Algorithm confusion: an HS256 token "signed" with the public key as the secret must not
    # pass. PyJWT refuses to make one, so it is made by hand.
    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    signed = b64(b'{"alg":"HS256","typ":"JWT"}') + b"." + b64(b'{"sub":"u1","exp":9999999999}')
    signature = hmac.new(public.encode(), signed, hashlib.sha256).digest()
    with pytest.raises(AuthenticationError):
        verifier.verify((signed + b"." + b64(signature)).decode())


def test_from_env_picks_hs256_or_rs256(tmp_path: Path, rsa_keys: tuple[bytes, str]) -> None:
    private, public = rsa_keys
    hs = JwtVerifier.from_env({"FLOWSTORE_JWT_SECRET": SECRET, "FLOWSTORE_JWT_AUDIENCE": "a"})
    assert (hs.algorithm, hs.audience) == ("HS256", "a")
    assert JwtVerifier.from_env({"FLOWSTORE_JWT_PUBLIC_KEY": public}).algorithm == "RS256"
    pem = tmp_path / "public.pem"
    pem.write_text(public)
    from_file = JwtVerifier.from_env({"FLOWSTORE_JWT_PUBLIC_KEY": str(pem)})
    assert from_file.verify(mint("u1", key=private, algorithm="RS256")).user_id == "u1"


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"FLOWSTORE_JWT_SECRET": "short"},
        {"FLOWSTORE_JWT_SECRET": SECRET, "FLOWSTORE_JWT_PUBLIC_KEY": "-----BEGIN PUBLIC KEY-----"},
        {"FLOWSTORE_JWT_PUBLIC_KEY": "-----BEGIN PUBLIC KEY-----\nnot a key\n"},
        {"FLOWSTORE_JWT_PUBLIC_KEY": "/no/such/file.pem"},
    ],
    ids=["nothing", "short-secret", "both", "bad-pem", "missing-file"],
)
def test_from_env_refuses_missing_or_unusable_settings(environ: dict[str, str]) -> None:
    with pytest.raises(AuthConfigError):
        JwtVerifier.from_env(environ)


# Over HTTP


@pytest.mark.parametrize(("method", "route"), USER_ROUTES + ADMIN_ROUTES)
def test_every_endpoint_is_401_without_a_token(
    client: httpx.Client, method: str, route: str
) -> None:
    response = call(client, method, route, {})
    body = assert_problem(response, 401, "UNAUTHENTICATED")
    assert body["details"]["reason"] == "missing"
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(("headers", "reason"), bad_credentials("alice"))
def test_bad_credentials_are_401(
    client: httpx.Client, headers: dict[str, str], reason: str
) -> None:
    response = client.get("/api/flows/mine", headers=headers)
    body = assert_problem(response, 401, "UNAUTHENTICATED")
    assert body["details"]["reason"] == reason
    if reason != "missing":
        assert response.headers["www-authenticate"] == 'Bearer error="invalid_token"'


@pytest.mark.parametrize(("method", "route"), ADMIN_ROUTES)
def test_admin_endpoints_are_403_for_ordinary_users(
    client: httpx.Client, alice: User, method: str, route: str
) -> None:
    body = assert_problem(call(client, method, route, alice.headers), 403, "FORBIDDEN")
    assert body["details"]["role"] == "admin"


@pytest.mark.parametrize("token", escalation_tokens("alice"))
def test_admin_claims_other_than_roles_grant_nothing(client: httpx.Client, token: str) -> None:
    for method, route in ADMIN_ROUTES:
        assert_problem(call(client, method, route, bearer(token)), 403, "FORBIDDEN")


def test_users_never_see_or_touch_each_others_flows(
    store: FlowStore, client: httpx.Client, alice: User, bob: User
) -> None:
    client.post(
        f"/api/flow/{ONBOARDING}/transition/start",
        json={"payload": {"secret": "alice-only"}},
        headers=alice.headers,
    )
    problems = []
    for probe in CROSS_USER_PROBES:
        answer = probe.send(client, intruder=(bob.id, bob.token), victim=alice.id, flow=ONBOARDING)
        problems += probe.problems(answer, victim=alice.id, secrets=["alice-only"])
    assert problems == []
    # Bob's attempts touched only Bob's own instance: Alice is where she was.
    state = store.get_flow_state(alice.id, ONBOARDING)
    assert state is not None
    assert (state.step, state.version) == ("profile-setup", 2)
    assert [h.success for h in store.get_flow_history(bob.id, ONBOARDING)] == [True, False]


def test_an_admin_is_also_a_user_with_flows_of_their_own(
    client: httpx.Client, admin: User, alice: User
) -> None:
    client.post(f"/api/flow/{ONBOARDING}/transition/start", headers=alice.headers)
    assert client.get("/api/flows/mine", headers=admin.headers).json() == []


class _StaticTokens:
    """A verifier of the app's own: a fixed table of opaque tokens."""

    def verify(self, token: str) -> Principal:
        users = {"t-carol": Principal("carol"), "t-boss": Principal("boss", frozenset({"admin"}))}
        if token not in users:
            raise AuthenticationError("Unknown token", reason="invalid")
        return users[token]


def test_the_verifier_is_pluggable(sqlite_url: str) -> None:
    with (
        FlowStore(sqlite_url) as store,
        LiveServer(create_app(store, _StaticTokens())) as live,
        httpx.Client(base_url=live.url) as client,
    ):
        assert client.post("/api/flows", json=linear("own"), headers=bearer("t-boss")).is_success
        state = client.post("/api/flow/own/transition/next", headers=bearer("t-carol")).json()
        assert state["userId"] == "carol"
        assert_problem(client.get("/api/flows", headers=bearer("t-carol")), 403, "FORBIDDEN")
        assert_problem(client.get("/api/flows/mine", headers=bearer("x")), 401, "UNAUTHENTICATED")


@pytest.mark.parametrize(
    "exp", [253402300800, 10**17, 2**63 - 1], ids=["year-10000", "1e17", "int64"]
)
def test_an_exp_past_year_9999_is_an_invalid_token_not_a_crash(
    client: httpx.Client, exp: int
) -> None:
    token = jwt.encode({"sub": "u-far", "exp": exp}, SECRET, algorithm="HS256")
    with pytest.raises(AuthenticationError) as caught:
        JwtVerifier(SECRET).verify(token)
    assert caught.value.reason == "invalid"
    assert_problem(client.get("/api/flows/mine", headers=bearer(token)), 401, "UNAUTHENTICATED")
    assert_problem(client.get("/api/statistics", headers=bearer(token)), 401, "UNAUTHENTICATED")


def test_clock_skew_leeway_defaults_to_30_seconds_and_is_configurable() -> None:
    recent = mint("u1", ttl=-10)  # expired 10 s ago: within the default skew
    assert JwtVerifier.from_env({"FLOWSTORE_JWT_SECRET": SECRET}).verify(recent).user_id == "u1"
    strict = JwtVerifier.from_env({"FLOWSTORE_JWT_SECRET": SECRET, "FLOWSTORE_JWT_LEEWAY": "0"})
    with pytest.raises(AuthenticationError, match="expired"):
        strict.verify(recent)
    for bad in ("-1", "soon", "86400"):
        with pytest.raises(AuthConfigError, match="FLOWSTORE_JWT_LEEWAY"):
            JwtVerifier.from_env({"FLOWSTORE_JWT_SECRET": SECRET, "FLOWSTORE_JWT_LEEWAY": bad})
