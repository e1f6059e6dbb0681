"""The web console at `/ui`: flows, funnels, users' journeys and operations, in a browser.

Server-rendered HTML (Jinja2) with one small hand-written script for live updates; everything is
served from this package (no build step, no CDN). `create_app` mounts it with `mount_console`; it
needs the admin role and signs browsers in with the API's bearer token kept in a cookie.
"""

from flowstore.adapters.http.console.common import Console
from flowstore.adapters.http.console.live import CLOSE_FORBIDDEN
from flowstore.adapters.http.console.routes import mount_console

__all__ = ["CLOSE_FORBIDDEN", "Console", "mount_console"]
