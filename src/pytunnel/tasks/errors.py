"""The errors of the task protocol: the one a task raises to send a typed application error,
and the ones a client raises for an error answer, one class per protocol code."""

from __future__ import annotations

from typing import Any

from .serializer import UNDEFINED

__all__ = [
    "AuthNotConfiguredError",
    "ConnectionFailedError",
    "ForbiddenError",
    "HttpStatusError",
    "InternalError",
    "InvalidJsonError",
    "InvalidResponseError",
    "MethodNotAllowedError",
    "NotFoundError",
    "PayloadTooLargeError",
    "TaskCallError",
    "TaskError",
    "TaskTimeoutError",
    "UnauthorizedError",
    "call_error",
]


class TaskError(Exception):
    """Raised by a task or an event handler to answer with a typed application error.

    Unlike any other exception (which the caller only sees as 500 "Internal Error"), its
    message, ``id`` and ``data`` reach the caller, with ``http_code`` as the status (500 if
    not given), as Runner's typed errors do."""

    def __init__(
        self,
        message: str,
        *,
        id: str | None = None,
        data: Any = UNDEFINED,
        http_code: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.id = id
        self.data = data
        if http_code is not None and not 400 <= http_code <= 599:
            raise ValueError(f"http_code must be an error status (400-599), not {http_code}")
        self.http_code = http_code


class TaskCallError(Exception):
    """An error answer to a call: the protocol's ``code``, the HTTP ``status``, the
    message, and for an application error its ``id`` and ``data``."""

    code = "UNKNOWN"

    def __init__(
        self,
        message: str,
        *,
        status: int,
        code: str | None = None,
        id: str | None = None,
        data: Any = UNDEFINED,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        if code is not None:
            self.code = code
        self.id = id
        self.data = data
        self.request_id = request_id

    def __str__(self) -> str:
        return f"[{self.code}] {self.message} (HTTP {self.status})"


class UnauthorizedError(TaskCallError):
    code = "UNAUTHORIZED"


class AuthNotConfiguredError(TaskCallError):
    code = "AUTH_NOT_CONFIGURED"


class ForbiddenError(TaskCallError):
    code = "FORBIDDEN"


class NotFoundError(TaskCallError):
    code = "NOT_FOUND"


class MethodNotAllowedError(TaskCallError):
    code = "METHOD_NOT_ALLOWED"


class InvalidJsonError(TaskCallError):
    code = "INVALID_JSON"


class PayloadTooLargeError(TaskCallError):
    code = "PAYLOAD_TOO_LARGE"


class InternalError(TaskCallError):
    code = "INTERNAL_ERROR"


class TaskTimeoutError(TaskCallError):
    """The call ran out of time: the server's 504 ``TIMEOUT`` (its task ran past its
    bound), or, with ``status`` 0, the client stopped waiting for the answer."""

    code = "TIMEOUT"


class InvalidResponseError(TaskCallError):
    """The answer is not the protocol's envelope (another server, or a truncated answer)."""

    code = "INVALID_RESPONSE"


class HttpStatusError(TaskCallError):
    """An error status with no protocol body (a proxy's page, say)."""

    code = "HTTP_ERROR"


class ConnectionFailedError(TaskCallError):
    """The server could not be reached or the connection broke; ``status`` is 0."""

    code = "CONNECTION_ERROR"


_BY_CODE: dict[str, type[TaskCallError]] = {
    cls.code: cls
    for cls in (
        UnauthorizedError,
        AuthNotConfiguredError,
        ForbiddenError,
        NotFoundError,
        MethodNotAllowedError,
        InvalidJsonError,
        PayloadTooLargeError,
        InternalError,
        TaskTimeoutError,
        InvalidResponseError,
        HttpStatusError,
        ConnectionFailedError,
    )
}


def call_error(
    status: int,
    message: str,
    code: str | None,
    *,
    id: str | None = None,
    data: Any = UNDEFINED,
    request_id: str | None = None,
) -> TaskCallError:
    """The error class for ``code`` (:class:`TaskCallError` for a code not known here)."""
    cls = _BY_CODE.get(code or "", TaskCallError)
    return cls(message, status=status, code=code, id=id, data=data, request_id=request_id)
