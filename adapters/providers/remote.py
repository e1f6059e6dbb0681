"""The `remote` source: an HTTP(S) URL answering with a definition document.

A URL containing `{flow_id}` is asked once per flow, and its 404 means "no such flow".
Credentials go only to the configured origin: redirects are followed by hand, within it.
"""

from __future__ import annotations

from urllib.parse import quote, urlsplit, urlunsplit

import httpx
import orjson
import yaml

from flowstore import FlowDefinition, InvalidArgumentError
from flowstore.adapters.providers.base import SourceUnavailableError
from flowstore.adapters.providers.config import Authentication
from flowstore.adapters.providers.files import definitions_in, load_yaml
from flowstore.definitions import DOT_IDS

MAX_REDIRECTS = 5
"""Most same-origin redirects a remote source may answer with."""


class RemoteFetcher:
    """GETs the URL (per flow when it holds `{flow_id}`), sending the configured credentials."""

    can_list = True

    def __init__(self, url: str, *, auth: Authentication | None, timeout: float) -> None:
        if urlsplit(url).scheme not in ("http", "https"):
            raise InvalidArgumentError("remote_url", _redact(url), "must be an http(s) URL")
        self.url = url
        self.per_flow = "{flow_id}" in url
        self.whole = not self.per_flow
        self.can_list = not self.per_flow
        self.name = f"remote:{_redact(url)}"
        headers = {"Accept": "application/json, application/yaml;q=0.9"}
        basic: httpx.BasicAuth | None = None
        if auth is not None:
            if auth.type == "bearer":
                headers["Authorization"] = f"Bearer {auth.credentials}"
            elif auth.type == "apikey":
                headers[auth.header] = auth.credentials
            elif auth.type == "basic":
                user, colon, password = auth.credentials.partition(":")
                if not colon:
                    raise InvalidArgumentError(
                        "authentication", auth, 'basic credentials must be "user:password"'
                    )
                basic = httpx.BasicAuth(user, password)
            else:
                raise InvalidArgumentError(
                    "authentication", auth, "type must be bearer, basic or apikey"
                )
        # Redirects are followed by hand, within the origin only: httpx drops Authorization on a
        # cross-origin redirect but forwards a custom API-key header to wherever it is sent.
        self._client = httpx.Client(
            headers=headers, auth=basic, timeout=timeout, follow_redirects=False
        )

    def fetch(self, flow_id: str | None) -> dict[str, FlowDefinition]:
        """The answer's flows; a failed, non-2xx or invalid answer is unavailable (404 per flow: none)."""
        url = self.url
        if self.per_flow:
            assert flow_id is not None
            if flow_id in DOT_IDS:  # a path segment of its own: "/flows/.." is "/"
                raise InvalidArgumentError("flow_id", flow_id, "must not be '.' or '..'")
            url = url.replace("{flow_id}", quote(flow_id, safe=""))
        try:
            response = self._get_same_origin(url)
        except httpx.HTTPError as exc:
            raise SourceUnavailableError(f"{type(exc).__name__}: {exc}") from None
        if self.per_flow and response.status_code == 404:
            return {}  # the server says there is no such flow: an answer, not a failure
        if not response.is_success:
            raise SourceUnavailableError(f"HTTP {response.status_code} {response.reason_phrase}")
        kind = response.headers.get("content-type", "")
        try:
            data = load_yaml(response.text) if "yaml" in kind else orjson.loads(response.content)
        except (orjson.JSONDecodeError, yaml.YAMLError) as exc:
            raise SourceUnavailableError(
                f"the answer is not {'YAML' if 'yaml' in kind else 'JSON'}: {exc}"
            ) from None
        definitions, problems = definitions_in(data, self.name)
        if problems:  # a half-valid answer is garbage too: keep the last good copy whole
            raise SourceUnavailableError("; ".join(problems))
        found = {d.flow: d for d in definitions}
        if self.per_flow and flow_id not in found:
            raise SourceUnavailableError(
                f"the answer for {flow_id!r} holds {sorted(found) or 'no flow'}"
            )
        return found

    def _get_same_origin(self, url: str) -> httpx.Response:
        origin = _origin(httpx.URL(url))
        response = self._client.get(url)
        for _ in range(MAX_REDIRECTS):
            if not response.has_redirect_location or response.next_request is None:
                return response
            target = response.next_request.url
            if _origin(target) != origin:
                raise SourceUnavailableError(
                    f"redirected to another origin ({_redact(str(target))}); credentials are "
                    "only sent to the configured origin"
                )
            response = self._client.send(response.next_request)
        raise SourceUnavailableError(f"more than {MAX_REDIRECTS} redirects")

    def close(self) -> None:
        """Close the HTTP client."""
        self._client.close()


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    default = {"http": 80, "https": 443}.get(url.scheme)
    return url.scheme, url.host, url.port or default


def _redact(url: str) -> str:
    """The URL without user info and query (either may hold a secret)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))
