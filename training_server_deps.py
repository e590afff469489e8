"""FastAPI dependencies shared by the route modules: settings, the task manager, the API
token check and the task id path parameter. All are `async def`: they do no I/O, and a plain
`def` dependency costs a worker-thread round trip per request."""

from __future__ import annotations

import hmac
import uuid
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from training_server_models import ServerConfig, UnauthorizedError

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


async def require_token(request: Request) -> None:
    """When an API token is set, demand it as `Authorization: Bearer ...` (or `?token=` for
    EventSource and download links, which cannot send headers)."""
    settings: ServerConfig = request.app.state.settings
    if settings.api_token is None:
        return
    expected = settings.api_token.get_secret_value().encode()
    header = request.headers.get("authorization", "")
    scheme, _, supplied = header.partition(" ")
    if scheme.lower() != "bearer" or not supplied:
        supplied = request.query_params.get("token", "")
    if not supplied or not hmac.compare_digest(supplied.strip().encode(), expected):
        raise UnauthorizedError(
            "A valid API token is required: send 'Authorization: Bearer <token>'.",
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
