"""The task protocol's errors: one class per code, unknown codes kept, typed errors checked."""

from __future__ import annotations

import pytest

from pytunnel.tasks import (
    ForbiddenError,
    InvalidJsonError,
    TaskCallError,
    TaskError,
    UnauthorizedError,
)
from pytunnel.tasks.errors import call_error
from pytunnel.tasks.serializer import UNDEFINED


def test_codes_map_to_classes() -> None:
    err = call_error(401, "Unauthorized", "UNAUTHORIZED", request_id="r1")
    assert type(err) is UnauthorizedError
    assert (err.status, err.code, err.message, err.request_id) == (
        401,
        "UNAUTHORIZED",
        "Unauthorized",
        "r1",
    )
    assert str(err) == "[UNAUTHORIZED] Unauthorized (HTTP 401)"
    assert type(call_error(403, "x", "FORBIDDEN")) is ForbiddenError
    assert isinstance(call_error(400, "x", "INVALID_JSON"), InvalidJsonError)


def test_unknown_code_is_kept_on_the_base_class() -> None:
    err = call_error(499, "Client Closed Request", "REQUEST_ABORTED", id="a", data={"k": 1})
    assert type(err) is TaskCallError
    assert err.code == "REQUEST_ABORTED"
    assert (err.id, err.data) == ("a", {"k": 1})
    assert call_error(500, "x", None).data is UNDEFINED


def test_task_error_http_code_must_be_an_error_status() -> None:
    assert TaskError("m", http_code=409).http_code == 409
    with pytest.raises(ValueError, match="400-599"):
        TaskError("m", http_code=200)


def test_every_code_has_its_class() -> None:
    """Each error class of the package is what its code's answer raises, and a subclass of
    TaskCallError."""
    import pytunnel.tasks as tasks

    classes = [
        getattr(tasks, name)
        for name in tasks.__all__
        if name.endswith("Error")
        and isinstance(getattr(tasks, name), type)
        and issubclass(getattr(tasks, name), TaskCallError)
        and getattr(tasks, name) is not TaskCallError
    ]
    assert len(classes) == 12
    for cls in classes:
        err = call_error(500, "m", cls.code)
        assert type(err) is cls, cls
        assert err.code == cls.code
