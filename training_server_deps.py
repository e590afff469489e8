"""FastAPI dependencies shared by the route modules: settings, the task manager, the API
token check and the task id path parameter. All are `async def`: they do no I/O, and a plain
`def` dependency costs a worker-thread round trip per request."""

from __future__ import annotations

import hashlib
import hmac
import uuid
from typing import TYPE_CHECKING, Annotated
from urllib.parse import urlsplit

from fastapi import Depends, Request

from training_server_models import ApiError, ServerConfig, UnauthorizedError

if TYPE_CHECKING:
    # Not at run time: stage modules import these dependencies, and the task manager
    # imports the stages (a cycle otherwise).
    from training_server_tasks import TaskManager


async def get_settings(request: Request) -> ServerConfig:
    """The settings the app was created with."""
    return request.app.state.settings


async def get_manager(request: Request) -> TaskManager:
    """The app's task manager."""
    return request.app.state.manager


class ForbiddenError(ApiError):
    """A credential that may not be used for this request (403)."""

    status_code = 403


SESSION_COOKIE = "gs_session"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def session_value(settings: ServerConfig) -> str:
    """The session cookie's value: derived from the token (HMAC), never the token itself, so
    a leaked cookie does not give the token away and a new token ends every session."""
    token = settings.api_token.get_secret_value() if settings.api_token else ""
    return hmac.new(token.encode(), b"gs-training-server session v1", hashlib.sha256).hexdigest()


def token_matches(settings: ServerConfig, supplied: str) -> bool:
    """Whether `supplied` is the API token (compared in constant time)."""
    if settings.api_token is None:
        return True
    expected = settings.api_token.get_secret_value().encode()
    return bool(supplied) and hmac.compare_digest(supplied.strip().encode(), expected)


def same_origin(request: Request) -> bool:
    """Whether a browser's Origin (or, without it, Referer) names this server; requests
    that send neither (curl, scripts) pass."""
    origin = request.headers.get("origin") or request.headers.get("referer")
    if not origin:
        return True
    host = urlsplit(origin).netloc.lower()
    return bool(host) and host == request.headers.get("host", "").lower()


async def require_token(request: Request) -> None:
    """When an API token is set, demand it as `Authorization: Bearer ...`, or the session
    cookie that POST /login sets (for the page's EventSource, images and download links,
    which cannot send headers). A token in the URL is not accepted: URLs end up in access
    logs, browser history and Referer headers. With the cookie, a request that changes
    something must come from this server's own page (Origin check against CSRF)."""
    settings: ServerConfig = request.app.state.settings
    if settings.api_token is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, supplied = header.partition(" ")
    if scheme.lower() == "bearer" and token_matches(settings, supplied):
        return
    cookie = request.cookies.get(SESSION_COOKIE, "")
    if cookie and hmac.compare_digest(cookie.encode(), session_value(settings).encode()):
        if request.method in SAFE_METHODS or same_origin(request):
            return
        raise ForbiddenError(
            "This request came from another site's page (its Origin is not this server)."
        )
    raise UnauthorizedError(
        "A valid API token is required: send 'Authorization: Bearer <token>' (the web page "
        "logs in with POST /login).",
        headers={"WWW-Authenticate": "Bearer"},
    )


async def task_id_path(task_id: uuid.UUID) -> str:
    """The task id from the path, validated as a UUID (422 otherwise) and made canonical."""
    return str(task_id)


Settings = Annotated[ServerConfig, Depends(get_settings)]
if TYPE_CHECKING:
    Manager = Annotated[TaskManager, Depends(get_manager)]
else:
    Manager = Annotated[object, Depends(get_manager)]  # FastAPI needs only the Depends
TaskId = Annotated[str, Depends(task_id_path)]
