"""Every error the API answers, as RFC 9457 problem details, from ONE mapping table.

ApiError                  raised by routes on purpose
├── NotFoundError    404  unknown id, or another tenant's (never 403: ids do not leak)
├── ConflictError    409  the request contradicts the current state
├── UnprocessableError 422  well-formed but semantically invalid
├── UnavailableError 503  the server lacks a setting this request needs
└── KeyRefusedError  401  the key is known and its secret right, but it expired or was revoked
Storage errors are translated in `_TABLE`; HTTP and validation errors by their handlers
(a JSON body FastAPI cannot parse is a 422 naming its line, never FastAPI's 400).

Anything else is a bug: `ErrorBoundary` answers 500 with an `error_id` only, and logs the
traceback under that id. A 500 never carries an exception's text (it may hold a row).
"""

from __future__ import annotations

import secrets
from http import HTTPStatus
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from storage.apikeys import DuplicateTenantError, InvalidTimezoneError
from storage.districts import (
    DistrictConflictError,
    DistrictMeterError,
    DistrictNotFoundError,
)
from storage.errors import RowRefusedError, StorageError, StorageUnavailableError
from storage.mailbox import (
    IdempotencyConflictError,
    InvalidCommandError,
    NoSuchMeterError,
    NotCancellableError,
)
from storage.quarantine import AlreadyResolvedError, NothingToDecodeError, TooManyRowsError
from storage.registry import DuplicateAddressError, ExchangeError

PROBLEM_JSON = "application/problem+json"
log = structlog.get_logger("api")


class ApiError(Exception):
    """An error with an HTTP status, a problem type slug and a human detail."""

    status = 400
    slug = "bad-request"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    def errors(self) -> list[dict[str, Any]] | None:
        """The problem's `errors` member, when there is more to say than the detail."""
        return None


class NotFoundError(ApiError):
    """The resource does not exist for this tenant."""

    status, slug = 404, "not-found"


class ConflictError(ApiError):
    """The request contradicts the resource's current state."""

    status, slug = 409, "conflict"


class UnprocessableError(ApiError):
    """The request is well-formed but its values cannot be used."""

    status, slug = 422, "unprocessable"


class UnavailableError(ApiError):
    """The server lacks what this request needs (a setting); retrying will not help until
    an operator fixes it."""

    status, slug = 503, "service-unavailable"


class KeyRefusedError(ApiError):
    """The key's secret is right but the key expired or was revoked: ask for a new one."""

    status = 401

    def __init__(self, slug: str, detail: str) -> None:
        super().__init__(detail)
        self.slug = slug


# exception class -> (status, problem type slug); the first matching class wins. A status
# of 500 is a bug: answered by `internal_error` with an error id, never the message.
_TABLE: tuple[tuple[type[Exception], int, str], ...] = (
    (DuplicateAddressError, 409, "duplicate-address"),
    (DuplicateTenantError, 409, "duplicate-tenant"),
    (ExchangeError, 409, "exchange-impossible"),
    (InvalidTimezoneError, 422, "invalid-timezone"),
    (AlreadyResolvedError, 409, "already-resolved"),
    (NothingToDecodeError, 409, "nothing-to-decode"),
    (TooManyRowsError, 422, "too-many-rows"),
    (NoSuchMeterError, 404, "not-found"),
    (InvalidCommandError, 422, "invalid-command"),
    (IdempotencyConflictError, 409, "idempotency-conflict"),
    (NotCancellableError, 409, "not-cancellable"),
    (DistrictNotFoundError, 404, "not-found"),
    (DistrictMeterError, 422, "district-meter"),
    (DistrictConflictError, 409, "district-conflict"),
    # a value the database cannot take (SQLSTATE class 22: out of range, an impossible date;
    # class 23: a constraint; an argument asyncpg cannot encode): the request carried it
    (RowRefusedError, 422, "invalid-value"),
    (StorageUnavailableError, 503, "database-unavailable"),
    (StorageError, 500, "internal-error"),
)
_HTTP_SLUGS = {
    401: "unauthorized",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    406: "not-acceptable",
    409: "conflict",
    413: "payload-too-large",
    415: "unsupported-media-type",
    422: "validation-error",
    503: "service-unavailable",
}


def problem(request: Request, status: int, slug: str, detail: str, **extra: Any) -> JSONResponse:
    """A problem+json response: type, title, status, detail, instance (+ extensions)."""
    body: dict[str, Any] = {
        "type": f"/problems/{slug}",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "instance": request.url.path,
        **extra,
    }
    headers = {"WWW-Authenticate": 'Bearer realm="nbmeter"'} if status == 401 else None
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    errors = exc.errors()
    extra = {} if errors is None else {"errors": errors}
    return problem(request, exc.status, exc.slug, exc.detail, **extra)


def internal_error(request: Request, exc: BaseException) -> JSONResponse:
    """500 with only a fresh error id; the traceback is logged under that id."""
    error_id = secrets.token_hex(8)
    log.error(
        "request.failed",
        error_id=error_id,
        method=request.method,
        path=request.url.path,
        exc_info=exc,
    )
    detail = f"internal error {error_id}: report this id to the operator"
    return problem(request, 500, "internal-error", detail, error_id=error_id)


def public_detail(exc: StorageError) -> str:
    """What a client may read of a storage error: its message if `_TABLE` answers it with
    a 4xx/503, else an error id (the message, which may quote a row, is only logged)."""
    for cls, status, _slug in _TABLE:
        if isinstance(exc, cls) and status != 500:
            return str(exc)
    error_id = secrets.token_hex(8)
    log.error("storage.refused", error_id=error_id, exc_info=exc)
    return f"refused by the database (error {error_id}): report this id to the operator"


def _storage_error(request: Request, exc: Exception) -> JSONResponse:
    for cls, status, slug in _TABLE:
        if isinstance(exc, cls) and status != 500:
            return problem(request, status, slug, str(exc))
    return internal_error(request, exc)


def _body_unreadable(request: Request, line: int, reason: str) -> JSONResponse:
    """422 for a JSON body FastAPI could not parse, as `api.bodies.BodyError` answers."""
    errors = [{"loc": ["body"], "line": line, "msg": reason, "type": "body_unreadable"}]
    return problem(request, 422, "validation-error", f"line {line}: {reason}", errors=errors)


def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    if status == 400 and isinstance(exc.__cause__, ValueError):
        # FastAPI's "error parsing the body": json.loads refused a value that is valid
        # JSON syntax (an integer of over 4,300 digits; BodyLimits checked UTF-8 and depth)
        return _body_unreadable(request, 1, f"not valid JSON: {exc.__cause__}")
    slug = _HTTP_SLUGS.get(status, "http-error")
    detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(status).phrase
    response = problem(request, status, slug, detail)
    if exc.headers:
        response.headers.update(exc.headers)
    return response


def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    found = exc.errors()
    if found and found[0].get("type") == "json_invalid" and isinstance(exc.body, str):
        # FastAPI's JSONDecodeError (loc: body, offset): name the line, as a route's own
        # `api.bodies.load_json` does
        doc, at = exc.body, int(found[0]["loc"][-1])
        line, column = doc.count("\n", 0, at) + 1, at - doc.rfind("\n", 0, at)
        msg = found[0].get("ctx", {}).get("error", "")
        return _body_unreadable(request, line, f"not valid JSON: {msg} (column {column})")
    errors = [
        {
            "loc": [str(p) for p in e.get("loc", ())],
            "msg": str(e.get("msg", "")),
            "type": str(e.get("type", "")),
        }
        for e in exc.errors()
    ]
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    detail = f"{'.'.join(first['loc'])}: {first['msg']}" if first["loc"] else str(first["msg"])
    return problem(request, 422, "validation-error", detail, errors=errors)


class ErrorBoundary:
    """ASGI middleware: an exception no handler took becomes `internal_error`'s 500.

    Once a response has started (a stream) nothing can be answered any more: the error is
    logged and re-raised, so the server breaks the connection and the client sees a
    truncated response rather than a complete-looking one.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app; answer its stray exception with a bare 500 problem."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tap(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tap)
        except Exception as exc:
            request = Request(scope)
            if started:
                log.error("response.broken", path=request.url.path, exc_info=exc)
                raise
            await internal_error(request, exc)(scope, receive, send)


def install(app: FastAPI) -> None:
    """Register the problem+json handlers and the error boundary on `app`."""
    app.add_middleware(ErrorBoundary)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StorageError, _storage_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
