"""Errors as the client sees them: OpenAI's schema `{"error": {"message", "type", "param", "code"}}`, and the
mapping from ttscale's exceptions and pydantic's validation errors to it (a 400 names the request field)."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from ttscale.errors import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    CapabilityError,
    ConfigError,
    ContextOverflow,
    UnknownNameError,
)


class ApiError(Exception):
    """An error answered to the client in OpenAI's error schema."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def api_error_from(exc: BaseException, *, prompt_param: str = "messages") -> ApiError:
    """Map a ttscale error (or anything else) to the HTTP error the client sees; `prompt_param` is the
    request field holding the prompt (`messages` on chat, `prompt` on completions), blamed when it is too
    long for the model."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, BackendUnavailable):
        return ApiError(502, f"upstream unavailable: {exc}", type="upstream_error", code="upstream_unavailable")
    if isinstance(exc, ContextOverflow):
        return ApiError(400, str(exc), param=prompt_param, code="context_length_exceeded")
    if isinstance(exc, CapabilityError):
        return ApiError(400, str(exc), param="model", code="unsupported_strategy")
    if isinstance(exc, UnknownNameError):
        return ApiError(400, str(exc), param="model", code="unknown_strategy")
    if isinstance(exc, ConfigError):
        return ApiError(400, str(exc), param=None, code="invalid_value")
    if isinstance(exc, BackendTimeout):
        return ApiError(504, f"upstream timeout: {exc}", type="upstream_error", code="upstream_timeout")
    if isinstance(exc, BackendError):
        return ApiError(502, f"upstream error: {exc}", type="upstream_error", code="upstream_error")
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error", code="internal_error")


def validation_error(exc: ValidationError, prefix: str = "", *, source: str | None = None) -> ApiError:
    """A 400 naming the request field: `prefix` + the error's location, or `source` when the value came
    from elsewhere (a strategy config field set by the body's `max_tokens`, the model prefix, `ttscale`)."""
    e = exc.errors()[0]
    loc = ".".join(str(x) for x in e["loc"])
    param: str | None
    if source is not None and source.startswith("ttscale.") and loc:
        param = f"ttscale.{loc}"
        what = f"'{param}'"
    elif source is not None:
        param = source
        what = f"'{loc}' (from {source})" if loc and loc != source else f"'{source}'"
    else:
        param = f"{prefix}{loc}" if loc else (prefix.rstrip(".") or None)
        what = f"'{param}'"
    if e["type"] == "extra_forbidden":
        msg = f"{what} is not supported here"
        if not prefix and source is None:
            msg += " (docs/serving.md lists the fields a strategy request takes)"
    else:
        msg = f"invalid {what}: {e['msg']}"
        if "input" in e and e["type"] != "missing":
            msg += f" (got {e['input']!r})"
    return ApiError(400, msg, param=param, code="invalid_value")

