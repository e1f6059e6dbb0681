"""Who is calling: bearer tokens checked by a pluggable `TokenVerifier`, JWT by default.

A verifier turns a token into a `Principal` (the user id and roles) or raises `AuthenticationError`.
`JwtVerifier` checks signature and expiry with PyJWT: `sub` is the user id, `roles` a list that may
hold `admin`. Apps with their own auth pass any object with a `verify(token) -> Principal` method.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import jwt

from flowstore.errors import AuthConfigError, AuthenticationError, PermissionDeniedError

__all__ = [
    "ADMIN_ROLE",
    "DEFAULT_LEEWAY_SECONDS",
    "AuthConfigError",
    "AuthenticationError",
    "JwtVerifier",
    "PermissionDeniedError",
    "Principal",
    "TokenVerifier",
]

ADMIN_ROLE = "admin"

DEFAULT_LEEWAY_SECONDS = 30.0
"""Clock skew tolerated on `exp` (and `nbf`/`iat`) by default: issuers' clocks drift a little."""

_MAX_USER_ID = 256
_MAX_LEEWAY_SECONDS = 3600
# RFC 7518 3.2: an HS256 key must be at least as long as the hash output (256 bits).
_MIN_SECRET_BYTES = 32


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: the user id every user endpoint acts on, and their roles."""

    user_id: str
    roles: frozenset[str] = field(default_factory=frozenset)
    expires_at: datetime | None = None
    """When the credential stops being valid; a WebSocket session is closed then."""

    @property
    def is_admin(self) -> bool:
        """Whether the caller may use the administrative endpoints."""
        return ADMIN_ROLE in self.roles


class TokenVerifier(Protocol):
    """Turns a bearer token into a `Principal`, or raises `AuthenticationError`."""

    def verify(self, token: str) -> Principal:
        """The caller the token names; `AuthenticationError` if it is not acceptable."""
        ...


class JwtVerifier:
    """Verifies JWTs: signature, `exp` (required), and `aud`/`iss` when configured.

    `key` is the HS256 shared secret, or a PEM public key for RS256 (any algorithm PyJWT knows can
    be named). Only the configured algorithm is accepted, so a token cannot pick its own.
    """

    def __init__(
        self,
        key: str | bytes,
        *,
        algorithm: str = "HS256",
        audience: str | None = None,
        issuer: str | None = None,
        leeway: float = DEFAULT_LEEWAY_SECONDS,
    ) -> None:
        try:
            self._key: Any = jwt.get_algorithm_by_name(algorithm).prepare_key(key)
        except (NotImplementedError, jwt.InvalidKeyError, ValueError) as exc:
            raise AuthConfigError(f"unusable {algorithm} key: {exc}", algorithm=algorithm) from None
        self.algorithm = algorithm
        self.audience = audience
        self.issuer = issuer
        self.leeway = leeway

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> JwtVerifier:
        """The verifier `flowstore serve` uses, configured by environment variables.

        `FLOWSTORE_JWT_SECRET` (HS256, at least 32 bytes) or `FLOWSTORE_JWT_PUBLIC_KEY` (RS256: the
        PEM text, or the path of a PEM file); optional `FLOWSTORE_JWT_AUDIENCE`, `FLOWSTORE_JWT_ISSUER`,
        `FLOWSTORE_JWT_LEEWAY` (seconds of clock skew tolerated, default 30).
        """
        env = os.environ if environ is None else environ
        leeway_text = env.get("FLOWSTORE_JWT_LEEWAY") or str(DEFAULT_LEEWAY_SECONDS)
        try:
            leeway = float(leeway_text)
        except ValueError:
            leeway = -1.0
        if not 0 <= leeway <= _MAX_LEEWAY_SECONDS:
            raise AuthConfigError(
                f"FLOWSTORE_JWT_LEEWAY must be a number of seconds from 0 to {_MAX_LEEWAY_SECONDS}, "
                f"not {leeway_text!r}"
            )
        secret = env.get("FLOWSTORE_JWT_SECRET") or None
        public_key = env.get("FLOWSTORE_JWT_PUBLIC_KEY") or None
        options: dict[str, Any] = {
            "audience": env.get("FLOWSTORE_JWT_AUDIENCE") or None,
            "issuer": env.get("FLOWSTORE_JWT_ISSUER") or None,
            "leeway": leeway,
        }
        if secret and public_key:
            raise AuthConfigError(
                "set FLOWSTORE_JWT_SECRET or FLOWSTORE_JWT_PUBLIC_KEY, not both: "
                "one server accepts one kind of signature"
            )
        if public_key:
            if not public_key.lstrip().startswith("-----BEGIN"):
                try:
                    public_key = Path(public_key).read_text(encoding="utf-8")
                except OSError as exc:
                    raise AuthConfigError(
                        f"FLOWSTORE_JWT_PUBLIC_KEY is neither PEM text nor a readable file: "
                        f"{exc.strerror}"
                    ) from None
            return cls(public_key, algorithm="RS256", **options)
        if secret:
            if len(secret.encode()) < _MIN_SECRET_BYTES:
                raise AuthConfigError(
                    f"FLOWSTORE_JWT_SECRET must be at least {_MIN_SECRET_BYTES} bytes for HS256"
                )
            return cls(secret, algorithm="HS256", **options)
        raise AuthConfigError(
            "no token verification configured: set FLOWSTORE_JWT_SECRET (HS256) or "
            "FLOWSTORE_JWT_PUBLIC_KEY (RS256)"
        )

    def verify(self, token: str) -> Principal:
        """The token's `sub` and `roles`; `AuthenticationError` for anything unacceptable."""
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[self.algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": ["sub", "exp"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthenticationError("Token has expired", reason="expired") from None
        except jwt.InvalidTokenError as exc:
            raise AuthenticationError(f"Invalid token: {exc}", reason="invalid") from None
        return _principal(claims)


def _principal(claims: Mapping[str, Any]) -> Principal:
    user_id, roles = claims.get("sub"), claims.get("roles", [])
    if (
        not isinstance(user_id, str)
        or not user_id.strip()
        or len(user_id) > _MAX_USER_ID
        or any(ord(c) < 32 or c == "\x7f" for c in user_id)
    ):
        raise AuthenticationError(
            f"Invalid token: 'sub' must be a non-empty string of at most {_MAX_USER_ID} "
            "characters, without control characters",
            reason="invalid",
        )
    if not isinstance(roles, list) or not all(isinstance(role, str) for role in roles):
        raise AuthenticationError(
            "Invalid token: 'roles' must be a list of strings", reason="invalid"
        )
    exp = claims.get("exp")
    try:
        expires_at = datetime.fromtimestamp(exp, UTC) if isinstance(exp, int | float) else None
    except (OverflowError, ValueError, OSError):
        # Past year 9999 (or not a finite number): no date can hold it, so no session can end then.
        raise AuthenticationError(
            "Invalid token: 'exp' is not a representable date", reason="invalid"
        ) from None
    return Principal(user_id=user_id, roles=frozenset(roles), expires_at=expires_at)
