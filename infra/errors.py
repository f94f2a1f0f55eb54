"""User-facing errors, mapped to OpenAI-format bodies in one place.

Exception tree::

    ShoalError                      (500 internal_error)
    ├── BadRequestError             (400 invalid_request_error)
    │   └── ContextLengthError      (400, code context_length_exceeded)
    ├── AuthenticationError         (401 authentication_error)
    ├── NotFoundError               (404 not_found_error)
    ├── PayloadTooLargeError        (413 invalid_request_error)
    ├── RateLimitError              (429 rate_limit_error)
    └── ServiceUnavailableError     (503 service_unavailable, Retry-After)

Body: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class ShoalError(Exception):
    status_code = 500
    error_type = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> ErrorBody:
        return ErrorBody(
            error=ErrorDetail(
                message=self.message, type=self.error_type, param=self.param, code=self.code
            )
        )


class BadRequestError(ShoalError):
    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthError(BadRequestError):
    def __init__(self, message: str, *, param: str | None = "messages") -> None:
        super().__init__(message, param=param, code="context_length_exceeded")


class AuthenticationError(ShoalError):
    status_code = 401
    error_type = "authentication_error"


class NotFoundError(ShoalError):
    status_code = 404
    error_type = "not_found_error"


class PayloadTooLargeError(ShoalError):
    status_code = 413
    error_type = "invalid_request_error"


class RateLimitError(ShoalError):
    status_code = 429
    error_type = "rate_limit_error"


class ServiceUnavailableError(ShoalError):
    status_code = 503
    error_type = "service_unavailable"

    def __init__(self, message: str, *, retry_after_s: int = 1, code: str | None = None) -> None:
        super().__init__(message, code=code, headers={"Retry-After": str(retry_after_s)})


def error_response(err: ShoalError) -> JSONResponse:
    return JSONResponse(err.body().model_dump(), status_code=err.status_code, headers=err.headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors: list[Any] = list(exc.errors())
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON", None
    if first.get("type") == "extra_forbidden":
        return f"unknown parameter: {param}", param
    detail = str(first.get("msg", "invalid value"))
    if first.get("type") == "value_error":  # a validator's own message: without pydantic's prefix
        detail = detail.removeprefix("Value error, ")
    return (f"{param}: {detail}" if param else str(detail)), param


def install_error_handlers(app: FastAPI) -> None:
    """Map every error a request can raise to an OpenAI-format response."""

    @app.exception_handler(ShoalError)
    async def _shoal(_: Request, exc: ShoalError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(BadRequestError(message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds: dict[int, type[ShoalError]] = {
            404: NotFoundError,
            405: BadRequestError,
            413: PayloadTooLargeError,
        }
        kind = kinds.get(exc.status_code, BadRequestError)
        err = kind(str(exc.detail))
        err.status_code = exc.status_code if exc.status_code < 500 else 500
        return error_response(err)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(ShoalError("internal error"))
