"""The error-code table itself (``errors.ErrorCode``)."""

from __future__ import annotations

import inspect
import re

from pytunnel import errors


def test_every_error_code_has_a_one_line_comment() -> None:
    """Each code is documented where it is defined, by the ``#:`` comment right above it."""
    lines = inspect.getsource(errors.ErrorCode).splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        match = re.match(r"\s+([A-Z_]+) = \d+$", line)
        if match and not lines[i - 1].strip().startswith("#:"):
            undocumented.append(match.group(1))
    assert undocumented == []
    assert len([line for line in lines if re.match(r"\s+[A-Z_]+ = \d+$", line)]) == len(
        errors.ErrorCode
    )


def test_error_codes_keep_the_local_and_remote_protocol_error_split() -> None:
    assert issubclass(errors.LocalProtocolError, errors.ProtocolError)
    assert issubclass(errors.RemoteProtocolError, errors.ProtocolError)
    assert not issubclass(errors.LocalProtocolError, errors.RemoteProtocolError)
    assert not issubclass(errors.RemoteProtocolError, errors.LocalProtocolError)
