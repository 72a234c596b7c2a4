"""Tasks and events over HTTP, wire-compatible with the Runner framework's HTTP exposure
(``@bluelibs/runner`` 5.5): a :class:`TaskServer` that Runner's own clients can call, and a
:class:`TaskClient` that can call a Runner server. See ``docs/tasks.md``."""

from __future__ import annotations

from .._http import HttpLimits
from ._client import Discovery, SyncTaskClient, TaskClient
from ._server import CorsConfig, EventHandler, TaskHandler, TaskServer
from ._uploads import BodyStream, InputFile, MultipartLimits
from .errors import (
    AuthNotConfiguredError,
    ConnectionFailedError,
    ForbiddenError,
    HttpStatusError,
    InternalError,
    InvalidJsonError,
    InvalidResponseError,
    MethodNotAllowedError,
    NotFoundError,
    PayloadTooLargeError,
    TaskCallError,
    TaskError,
    TaskTimeoutError,
    UnauthorizedError,
)
from .serializer import UNDEFINED, URL, JsError, RegExp, RunnerMap, SerializationError, Undefined

__all__ = [
    "UNDEFINED",
    "URL",
    "AuthNotConfiguredError",
    "BodyStream",
    "ConnectionFailedError",
    "CorsConfig",
    "Discovery",
    "EventHandler",
    "ForbiddenError",
    "HttpLimits",
    "HttpStatusError",
    "InputFile",
    "InternalError",
    "InvalidJsonError",
    "InvalidResponseError",
    "JsError",
    "MethodNotAllowedError",
    "MultipartLimits",
    "NotFoundError",
    "PayloadTooLargeError",
    "RegExp",
    "RunnerMap",
    "SerializationError",
    "SyncTaskClient",
    "TaskCallError",
    "TaskClient",
    "TaskError",
    "TaskHandler",
    "TaskServer",
    "TaskTimeoutError",
    "UnauthorizedError",
    "Undefined",
]
