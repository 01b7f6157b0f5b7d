"""One error hierarchy, rendered as the OpenAI error envelope ``{"error": {message, type, param, code}}``."""

from __future__ import annotations

import json
from typing import Any


class RouterError(Exception):
    status = 500
    type = "internal_error"
    close_connection = False  # answer, then close the client's connection (e.g. its body was not read)

    def __init__(
        self, message: str, *, param: str | None = None, code: str | int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.status
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def json_bytes(self) -> bytes:
        return json.dumps(self.body()).encode()


class BadRequest(RouterError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(RouterError):
    status = 401
    type = "authentication_error"


class Forbidden(RouterError):
    status = 403
    type = "permission_error"


class RequestTimeout(RouterError):
    status = 408
    type = "timeout_error"
    close_connection = True


class NotFound(RouterError):
    status = 404
    type = "not_found_error"


class ModelNotFound(NotFound):
    def __init__(self, name: str, available: list[str]) -> None:
        shown = ", ".join(available) if available else "(none)"
        super().__init__(
            f"The model `{name}` does not exist. Available models: {shown}",
            param="model",
            code="model_not_found",
        )


class MethodNotAllowed(RouterError):
    status = 405
    type = "invalid_request_error"


class PayloadTooLarge(RouterError):
    status = 413
    type = "invalid_request_error"


class ExpectationFailed(RouterError):
    status = 417
    type = "invalid_request_error"


class TooManyRequests(RouterError):
    status = 429
    type = "rate_limit_error"


class BadGateway(RouterError):
    status = 502
    type = "upstream_error"


class ModelUnavailable(RouterError):
    """The model could not be made resident (its process exited or never became healthy)."""

    status = 503
    type = "model_load_error"


class ServiceUnavailable(RouterError):
    """The router itself cannot take the request now (too many connections)."""

    status = 503
    type = "service_unavailable_error"


class GatewayTimeout(RouterError):
    status = 504
    type = "timeout_error"
