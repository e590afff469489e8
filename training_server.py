"""Gaussian Splatting training server: upload a video, follow it through preprocessing and
training, download the result. The app factory, its lifespan and the command-line entry point;
the routes live in training_server_routes (tasks) and training_server_results (results).

Run: `python training_server.py [--host H] [--port P]`; settings come from TRAINING_SERVER_*
environment variables or a .env file (see README.md).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from html import escape
from typing import Any

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
)
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Mount

import training_server_metrics
import training_server_state as state
import training_server_webhooks
from training_server_db import Database, DatabaseDamagedError, TaskNotFoundError, check_integrity
from training_server_deps import (
    SESSION_COOKIE,
    ForbiddenError,
    require_token,
    same_origin,
    session_value,
    token_matches,
)
from training_server_exports import router as exports_router
from training_server_idempotency import install as install_idempotency
from training_server_limits import DiskReservations, UploadLimits, guarded_h11
from training_server_models import HERE, VERSION, ApiError, ServerConfig, UnauthorizedError
from training_server_results import router as results_router
from training_server_routes import router as task_router
from training_server_tasks import TaskManager
from training_server_tus import install as install_tus
from training_server_utils import jsonable_errors, readable_errors

STATIC_DIR = HERE / "static"
log = logging.getLogger("training_server")

# -- error answers -----------------------------------------------------------------------


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error with a JSON body holding a readable `detail`."""

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        return JSONResponse(
            {"detail": readable_errors(errors), "errors": jsonable_errors(errors)}, 422
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            # Starlette names the methods of the first route on the path only; a path served
            # by several routes (GET and DELETE /tasks/{id}) allows all of theirs.
            headers["Allow"] = ", ".join(allowed_methods(request))
        return JSONResponse({"detail": exc.detail}, exc.status_code, headers=headers or None)

    @app.exception_handler(state.InvalidTransitionError)
    async def lost_race(_: Request, exc: state.InvalidTransitionError) -> JSONResponse:
        return JSONResponse(
            {"detail": f"The task changed meanwhile: it is {exc.current} now; look again."}, 409
        )

    @app.exception_handler(TaskNotFoundError)
    async def gone_meanwhile(_: Request, exc: TaskNotFoundError) -> JSONResponse:
        return JSONResponse({"detail": f"No task with id {exc.args[0]}."}, 404)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        error_id = uuid.uuid4().hex[:12]
        log.error("error %s in %s %s", error_id, request.method, request.url.path, exc_info=exc)
        return JSONResponse(
            {
                "detail": f"Internal server error (error id {error_id}: see the server log).",
                "error_id": error_id,
            },
            500,
        )


METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route of the app accepts at the request's path."""
    return [
        method
        for method in METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] == Match.FULL
            for route in request.app.router.routes
            if not isinstance(route, Mount)  # static files: they answer GET alone
        )
    ]


# -- the page's session ----------------------------------------------------------------------

ACCESS_LOG_CREDENTIALS = re.compile(r"(?i)([?&](?:token|access_token|api_token)=)[^&\s\"]*")


class RedactCredentials(logging.Filter):
    """Rewrites `token=...` in access-log lines: a URL with a token (from an old page or a
    hand-made link, refused now) must not put it in the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                ACCESS_LOG_CREDENTIALS.sub(r"\1[redacted]", a) if isinstance(a, str) else a
                for a in record.args
            )
        if isinstance(record.msg, str):
            record.msg = ACCESS_LOG_CREDENTIALS.sub(r"\1[redacted]", record.msg)
        return True


class Login(BaseModel):
    """POST /login: the API token, once; the answer sets the session cookie."""

    token: str = ""


def install_session(app: FastAPI) -> None:
    """POST /login checks the token and sets a session cookie (HttpOnly, SameSite=Strict,
    Secure over https) that EventSource, images and download links send by themselves;
    POST /logout removes it. Scripts keep sending `Authorization: Bearer`."""

    @app.post("/login", status_code=204, include_in_schema=False)
    async def login(request: Request, body: Login | None = None) -> Response:
        settings: ServerConfig = app.state.settings
        answer = Response(status_code=204)
        if settings.api_token is None:
            return answer
        scheme, _, bearer = request.headers.get("authorization", "").partition(" ")
        supplied = (body.token if body else "") or (bearer if scheme.lower() == "bearer" else "")
        if not same_origin(request):
            raise ForbiddenError("Log in from this server's own page.")
        if not token_matches(settings, supplied):
            raise UnauthorizedError(
                "This token was refused.", headers={"WWW-Authenticate": "Bearer"}
            )
        answer.set_cookie(
            SESSION_COOKIE,
            session_value(settings),
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
        )
        return answer

    @app.post("/logout", status_code=204, include_in_schema=False)
    async def logout() -> Response:
        answer = Response(status_code=204)
        answer.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
        return answer


# -- the API docs, offline ------------------------------------------------------------------

SWAGGER_URL = "/vendor/swagger-ui"
SWAGGER_DIR = HERE / "node_modules" / "swagger-ui-dist"


def install_docs(app: FastAPI) -> None:
    """/openapi.json and /docs behind the token; /docs is Swagger UI from node_modules
    (package.json) when it is installed, else a plain page listing the endpoints."""

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(require_token)])
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=[Depends(require_token)])
    async def docs() -> Response:
        if (SWAGGER_DIR / "swagger-ui-bundle.js").is_file():
            return get_swagger_ui_html(
                openapi_url="/openapi.json",
                title=f"{app.title} - API",
                swagger_js_url=f"{SWAGGER_URL}/swagger-ui-bundle.js",
                swagger_css_url=f"{SWAGGER_URL}/swagger-ui.css",
                swagger_favicon_url=f"{SWAGGER_URL}/favicon-32x32.png",
            )
        return HTMLResponse(endpoint_list(app.openapi(), app.title))


def endpoint_list(spec: dict[str, Any], title: str) -> str:
    """A page naming each endpoint and what it does, with no script (the fallback /docs)."""
    rows = []
    for path, operations in spec.get("paths", {}).items():
        for method, operation in operations.items():
            summary = operation.get("summary") or ""
            description = (operation.get("description") or "").strip()
            rows.append(
                f"<dt><code>{escape(method.upper())} {escape(path)}</code></dt>"
                f"<dd><b>{escape(summary)}</b> {escape(description)}</dd>"
            )
    return (
        f"<!doctype html><html><head><meta charset=utf-8><title>{escape(title)} - API</title>"
        f"</head><body><h1>{escape(title)}: API</h1><p>The machine-readable description is "
        f'<a href="/openapi.json">/openapi.json</a>; the interactive Swagger UI is served '
        f"once <code>npm ci</code> has installed it.</p><dl>{''.join(rows)}</dl></body></html>"
    )


# -- the app -----------------------------------------------------------------------------


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Open the database, recover and start the task manager; stop it on the way out."""
    settings: ServerConfig = app.state.settings
    try:
        await check_integrity(settings.db_path)
    except DatabaseDamagedError as exc:
        log.error("%s", exc)
        raise
    db = await Database.open(settings.db_path)
    manager = TaskManager(settings, db)
    app.state.manager = manager
    try:
        await manager.start()
        if settings.api_token is None and settings.host not in {"127.0.0.1", "localhost", "::1"}:
            log.warning(
                "No TRAINING_SERVER_API_TOKEN is set and the server listens on %s: anyone "
                "who can reach it can upload, download and delete tasks.",
                settings.host,
            )
        yield
    finally:
        await manager.shutdown()
        await db.close()


def create_app(settings: ServerConfig | None = None) -> FastAPI:
    """Build the application for `settings` (read from the environment when omitted)."""
    settings = settings or ServerConfig()
    app = FastAPI(
        title="Gaussian Splatting Training Server",
        version=VERSION,
        lifespan=lifespan,
        # Served below, from this machine and behind the token: the defaults load Swagger
        # UI from a CDN, which an offline server cannot reach.
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        description="Upload a video; it becomes a COLMAP dataset and a 3D Gaussian Splatting "
        "model you can download.",
    )
    app.state.settings = settings
    app.state.disk_reservations = DiskReservations()
    install_error_handlers(app)
    app.add_middleware(
        UploadLimits,
        max_uploads=settings.max_concurrent_uploads,
        idle_timeout=settings.upload_idle_timeout,
    )
    # Before CORS, so that CORS stays outermost and replayed answers get its headers too.
    install_idempotency(app)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE", "PATCH", "HEAD"],
            allow_headers=[
                "Authorization",
                "Content-Type",
                "Idempotency-Key",
                "Tus-Resumable",
                "Upload-Length",
                "Upload-Offset",
                "Upload-Metadata",
            ],
            expose_headers=[
                "Location",
                "Upload-Offset",
                "Upload-Length",
                "Upload-Expires",
                "Upload-Task-Id",
                "Tus-Resumable",
                "Idempotent-Replayed",
            ],
        )
    api = APIRouter(dependencies=[Depends(require_token)])
    api.include_router(task_router)
    app.include_router(api)
    install_tus(app)  # /uploads/ behind the token, and its tus-expiry loop in the lifespan
    app.include_router(results_router)
    app.include_router(exports_router)

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        page = STATIC_DIR / "index.html"
        if not page.is_file():
            return PlainTextResponse("The web page is not installed (static/index.html).", 404)
        return FileResponse(page, headers={"Cache-Control": "no-cache"})

    install_session(app)
    install_docs(app)
    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    # The page's 3D viewers, from `npm ci` (package.json); the page says so when missing.
    vendor = {
        "/vendor/three/build": "three/build",
        "/vendor/three/addons": "three/examples/jsm",
        "/vendor/spark": "@sparkjsdev/spark/dist",
        SWAGGER_URL: "swagger-ui-dist",
        "/vendor/tus-js-client": "tus-js-client/dist",
    }
    for url, folder in vendor.items():
        if (HERE / "node_modules" / folder).is_dir():
            app.mount(url, StaticFiles(directory=HERE / "node_modules" / folder), name=url)
    training_server_webhooks.install(app)
    training_server_metrics.install(app)  # /metrics checks the token itself (public setting)
    return app


# -- entry point -------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; everything else is a TRAINING_SERVER_* setting."""
    parser = argparse.ArgumentParser(
        description="Gaussian Splatting training server: video upload -> COLMAP dataset -> "
        "3D Gaussian Splatting model. Settings come from TRAINING_SERVER_* environment "
        "variables or a .env file (see README.md).",
    )
    parser.add_argument("--host", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--port", type=int, help="port to listen on (default 8000)")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Start the server."""
    args = parse_args(argv)
    overrides = {k: v for k, v in {"host": args.host, "port": args.port}.items() if v}
    settings = ServerConfig(**overrides)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=max(5, int(settings.kill_grace) + 5),
        # h11, not httptools: it bounds the request line and headers in bytes, and
        # GuardedH11Protocol bounds them in time (see training_server_limits).
        http=guarded_h11(settings.header_timeout),
        h11_max_incomplete_event_size=settings.max_header_bytes,
    )
    # After uvicorn.Config, which sets up uvicorn's loggers.
    logging.getLogger("uvicorn.access").addFilter(RedactCredentials())
    server = uvicorn.Server(config)
    server.run()
    if not server.started:
        sys.exit(3)  # as uvicorn.run does when start-up fails


if __name__ == "__main__":
    main()
