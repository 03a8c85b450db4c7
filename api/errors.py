"""Every error the API answers, as RFC 9457 problem details, from ONE mapping table.

ApiError                  raised by routes on purpose
├── NotFoundError    404  unknown id, or another tenant's (never 403: ids do not leak)
├── ConflictError    409  the request contradicts the current state
└── UnprocessableError 422  well-formed but semantically invalid
Storage errors are translated in `_TABLE`; HTTP and validation errors by their handlers.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import asyncpg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from storage.apikeys import DuplicateTenantError, InvalidTimezoneError
from storage.errors import StorageError, StorageUnavailableError
from storage.quarantine import AlreadyResolvedError, NothingToDecodeError, TooManyRowsError
from storage.registry import DuplicateAddressError, ExchangeError

PROBLEM_JSON = "application/problem+json"


class ApiError(Exception):
    """An error with an HTTP status, a problem type slug and a human detail."""

    status = 400
    slug = "bad-request"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFoundError(ApiError):
    """The resource does not exist for this tenant."""

    status, slug = 404, "not-found"


class ConflictError(ApiError):
    """The request contradicts the resource's current state."""

    status, slug = 409, "conflict"


class UnprocessableError(ApiError):
    """The request is well-formed but its values cannot be used."""

    status, slug = 422, "unprocessable"


# exception class -> (status, problem type slug); the first matching class wins
_TABLE: tuple[tuple[type[Exception], int, str], ...] = (
    (DuplicateAddressError, 409, "duplicate-address"),
    (DuplicateTenantError, 409, "duplicate-tenant"),
    (ExchangeError, 409, "exchange-impossible"),
    (InvalidTimezoneError, 422, "invalid-timezone"),
    (AlreadyResolvedError, 409, "already-resolved"),
    (NothingToDecodeError, 409, "nothing-to-decode"),
    (TooManyRowsError, 422, "too-many-rows"),
    (StorageUnavailableError, 503, "database-unavailable"),
    (StorageError, 500, "storage-error"),
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
    return problem(request, exc.status, exc.slug, exc.detail)


def _storage_error(request: Request, exc: Exception) -> JSONResponse:
    for cls, status, slug in _TABLE:
        if isinstance(exc, cls):
            return problem(request, status, slug, str(exc))
    return problem(request, 500, "internal-error", "internal error")  # pragma: no cover


def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    slug = _HTTP_SLUGS.get(status, "http-error")
    detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(status).phrase
    response = problem(request, status, slug, detail)
    if exc.headers:
        response.headers.update(exc.headers)
    return response


def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
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


def _data_error(request: Request, exc: Exception) -> JSONResponse:
    # SQLSTATE class 22 (a value out of range, an impossible date, ...) or an argument
    # asyncpg cannot encode: the request carried a value the database cannot take
    return problem(request, 422, "invalid-value", f"a value is out of range or invalid: {exc}")


def install(app: FastAPI) -> None:
    """Register the problem+json handlers on `app`."""
    app.add_exception_handler(asyncpg.DataError, _data_error)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StorageError, _storage_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
