"""Who may talk to the Serve application: the Host allow-list (against DNS rebinding), same-origin
requests only from browsers (against other web pages posting to a local server), and an optional bearer
token on the API (/v1/...). The page, its files, /docs and /healthz stay open, so the page can load and
ask for the token."""

import hmac
import os
from pathlib import Path

from datasets.errors import UserError
from deploy.inputs import BadInput
from deploy.settings import ServeSettings

TOKEN_ENV = "FORAM_SERVE_TOKEN"
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def read_token(settings: ServeSettings) -> str:
    """The bearer token the API asks for: settings.auth_token_file's content, else $FORAM_SERVE_TOKEN,
    else "" (no authentication). A UserError for a token file that is missing or empty."""
    if not settings.auth_token_file:
        return os.environ.get(TOKEN_ENV, "").strip()
    path = Path(settings.auth_token_file)
    try:
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(
            f"auth_token_file: cannot read {path} ({getattr(e, 'strerror', None) or e})"
        ) from None
    if not token or any(c.isspace() for c in token):
        raise UserError(
            f"auth_token_file: {path} must hold one token (no spaces), got {len(token)} characters"
        )
    return token


def host_name(host: str) -> str:
    """The name of a Host header value ("example.org:8000" -> "example.org", "[::1]:8000" -> "[::1]")."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def check_request(settings: ServeSettings, token: str, path: str, headers) -> None:
    """A BadInput (400 wrong Host, 403 another site's page, 401 no or wrong token) for a request this
    server must not answer; `headers` as Starlette's (case-insensitive get)."""
    host = headers.get("host", "")
    if "*" not in settings.allowed_hosts and host_name(host) not in settings.allowed_hosts:
        raise BadInput(400, f"Host {host!r} is not one this server answers to (allowed_hosts)")
    origin = headers.get("origin")
    # Browsers send Origin with every cross-site POST: a form on another site may post multipart uploads
    # to a local server without asking (CORS preflights only cover other kinds of request).
    if origin is not None and origin.split("://", 1)[-1].lower() != host.lower():
        raise BadInput(403, f"requests from the page {origin!r} are refused: use this server's own page")
    if token and path.startswith("/v1/"):
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise BadInput(401, "this server asks for a token: send the header Authorization: Bearer TOKEN")
