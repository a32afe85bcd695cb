"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status.

Every refusal of a client's request is an ApiError raised before any model call; the app turns
it (and pydantic's validation errors, unknown routes, anything unexpected) into this body, so a
client never sees a traceback or a class name.
"""

from __future__ import annotations

from typing import Any

from seqr.core.errors import SeqrError

_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class ApiError(SeqrError):
    """A request the server refuses (status 4xx) or cannot serve (5xx)."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_body(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    kind = _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
