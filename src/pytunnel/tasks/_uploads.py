"""Request bodies that are not JSON: Runner's multipart uploads and raw octet streams.

**Multipart** (``multipart/form-data``, parsed by python-multipart as it streams in): a
``__manifest`` field holds ``{"input": ...}`` in which each file is a sentinel
``{"$runnerFile": "File", "id": ID, "meta": {...}}``, and each file comes as a part named
``file:ID``. The task gets the input with every sentinel replaced by an :class:`InputFile`.
Files are spooled as they arrive (in memory up to 1 MiB, then to a temporary file), so
memory stays bounded whatever the upload, and the task reads them as streams once the
request is complete. Runner's limits and answers: 20 MB per file, 10 files, 100 fields,
1 MiB per field (413 ``PAYLOAD_TOO_LARGE``, the rest left unread), no manifest (400
``MISSING_MANIFEST``), a manifest naming a file with no part (500 ``MISSING_FILE_PART``),
a malformed body (400 ``INVALID_MULTIPART``).

**Octet stream** (``application/octet-stream``): the task's input is a :class:`BodyStream`
reading the request body as it arrives (Runner hands its task the raw request instead).
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Callable
from typing import IO, Any

import attrs
import trio
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from .._http import BodyError, BodyTimeout, Request
from . import serializer
from .serializer import UNDEFINED, SerializationError

__all__ = ["BodyStream", "InputFile", "MultipartLimits", "UploadRefused", "read_multipart"]

SPOOL_IN_MEMORY = 1024 * 1024
READ_SIZE = 64 * 1024


@attrs.frozen
class MultipartLimits:
    """Runner's multipart limits (its defaults)."""

    file_size: int = 20 * 1024 * 1024
    files: int = 10
    fields: int = 100
    field_size: int = 1024 * 1024


class UploadRefused(Exception):
    """An upload answered with ``status`` and the protocol's ``code``."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


class InputFile:
    """A file of a multipart call, as the task gets it: its metadata (the manifest's, else
    the part's) and its bytes, read as a stream (:meth:`chunks`), whole (:meth:`read`) or
    saved (:meth:`save`). Readable again from the start each time."""

    def __init__(self, file_id: str) -> None:
        self.id = file_id
        self.name = "upload"
        self.type: str | None = None
        #: as declared by the sender (``meta.size``); :attr:`received` is what arrived
        self.size: int | None = None
        self.last_modified: int | None = None
        self.extra: Any = UNDEFINED
        self.received = 0
        self._spool: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)  # noqa: SIM115 - closed by close()
        self._expected = False
        self._connected = False

    def __repr__(self) -> str:
        return f"<InputFile {self.id!r} {self.name!r} {self.type} {self.received} bytes>"

    async def chunks(self, size: int = READ_SIZE) -> AsyncIterator[bytes]:
        """The file's bytes, ``size`` at a time (disk reads run in a worker thread)."""
        await trio.to_thread.run_sync(self._spool.seek, 0)
        while chunk := await trio.to_thread.run_sync(self._spool.read, size):
            yield chunk

    async def read(self) -> bytes:
        parts = [chunk async for chunk in self.chunks()]
        return b"".join(parts)

    async def save(self, path: str) -> int:
        """Write the file to ``path``; returns the bytes written."""
        written = 0
        async with await trio.open_file(path, "wb") as out:
            async for chunk in self.chunks():
                await out.write(chunk)
                written += len(chunk)
        return written

    def close(self) -> None:
        self._spool.close()

    @property
    def closed(self) -> bool:
        """Whether the spool was released (the call it came with was answered)."""
        return bool(self._spool.closed)

    def _apply_meta(self, meta: object) -> None:
        if not isinstance(meta, dict):
            return
        if isinstance(meta.get("name"), str):
            self.name = meta["name"]
        if isinstance(meta.get("type"), str):
            self.type = meta["type"]
        if isinstance(meta.get("size"), int):
            self.size = meta["size"]
        if isinstance(meta.get("lastModified"), int):
            self.last_modified = meta["lastModified"]
        if "extra" in meta:
            self.extra = meta["extra"]


class BodyStream:
    """An ``application/octet-stream`` request body, read as it arrives; once."""

    def __init__(self, request: Request) -> None:
        self._request = request
        self.content_type = request.header("content-type") or ""
        self.length = request.content_length()

    async def chunks(self) -> AsyncIterator[bytes]:
        async for chunk in self._request.body_chunks(limit=None):
            yield chunk

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body (``BodyTooLarge`` past ``limit``)."""
        return await self._request.read_body(limit=limit)


def is_multipart(content_type: str) -> bool:
    return "multipart/form-data" in content_type.lower()


def is_octet_stream(content_type: str) -> bool:
    base = content_type.split(";", 1)[0].strip().lower()
    return base == "application/octet-stream"


def _too_large(message: str) -> UploadRefused:
    return UploadRefused(413, message, "PAYLOAD_TOO_LARGE")


def _invalid(message: str = "Invalid multipart payload") -> UploadRefused:
    return UploadRefused(400, message, "INVALID_MULTIPART")


class _Parts:
    """The callbacks of one multipart body: each part's headers, then its data routed to
    the manifest, a file's spool, or nowhere, with every limit counted as bytes come."""

    def __init__(self, limits: MultipartLimits) -> None:
        self.limits = limits
        self.files: dict[str, InputFile] = {}
        self.manifest: bytes | None = None
        self.fields = 0
        self.file_parts = 0
        self.ended = False
        self._header_name = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._sink: Callable[[bytes], None] | None = None

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value_data,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_end": self._end,
        }

    def file(self, file_id: str) -> InputFile:
        found = self.files.get(file_id)
        if found is None:
            if len(self.files) >= self.limits.files:
                raise _too_large("Files limit exceeded")
            found = self.files[file_id] = InputFile(file_id)
        return found

    def _part_begin(self) -> None:
        self._headers = {}
        self._sink = None

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._header_name.strip().lower()] = self._header_value.strip()
        self._header_name = self._header_value = b""

    def _headers_finished(self) -> None:
        disposition, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if disposition.lower() != b"form-data" or b"name" not in options:
            raise _invalid()
        name = options[b"name"].decode("utf-8", "replace")
        if b"filename" in options:
            self.file_parts += 1
            if self.file_parts > self.limits.files:
                raise _too_large("Files limit exceeded")
            if not name.startswith("file:"):
                self._sink = _discard
                return
            file = self.file(name[len("file:") :])
            if file.name == "upload":
                file.name = options[b"filename"].decode("utf-8", "replace")
            content_type = self._headers.get(b"content-type")
            if content_type and file.type is None:
                file.type = content_type.decode("latin-1")
            file._connected = True
            self._sink = _file_sink(file, self.limits.file_size)
            return
        self.fields += 1
        if self.fields > self.limits.fields:
            raise _too_large("Fields limit exceeded")
        if name != "__manifest":
            self._sink = _field_counter(self.limits.field_size)
            return
        self.manifest = b""

        def manifest(data: bytes) -> None:
            assert self.manifest is not None
            if len(self.manifest) + len(data) > self.limits.field_size:
                raise _too_large("Field limit exceeded")
            self.manifest += data

        self._sink = manifest

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._sink is not None:
            self._sink(data[start:end])

    def _end(self) -> None:
        self.ended = True


def _discard(data: bytes) -> None:
    return None


def _field_counter(limit: int) -> Callable[[bytes], None]:
    seen = 0

    def count(data: bytes) -> None:
        nonlocal seen
        seen += len(data)
        if seen > limit:
            raise _too_large("Field limit exceeded")

    return count


def _file_sink(file: InputFile, limit: int) -> Callable[[bytes], None]:
    """The sink of a file part: its spool, cut at ``limit``."""

    def write(data: bytes) -> None:
        file.received += len(data)
        if file.received > limit:
            raise _too_large("File size limit exceeded")
        file._spool.write(data)

    return write


def _hydrate(value: Any, parts: _Parts, depth: int = 0) -> Any:
    """The manifest's input with each file sentinel replaced by its :class:`InputFile`.

    The walk is bounded as the serializer's is (:data:`serializer.MAX_DEPTH`): the JSON
    parser reads nestings nearly as deep as the interpreter's recursion limit, and this walk
    starts deeper in the stack, so an unbounded one would fail half way with a
    ``RecursionError`` instead of the protocol's answer."""
    if depth > serializer.MAX_DEPTH:
        raise _invalid("Invalid manifest")
    # plain loops, not comprehensions: a comprehension is one more frame per level
    if isinstance(value, list):
        items = []
        for item in value:
            items.append(_hydrate(item, parts, depth + 1))
        return items
    if not isinstance(value, dict):
        return value
    if value.get("$runnerFile") == "File" and isinstance(value.get("id"), str):
        file = parts.file(value["id"])
        file._expected = True
        file._apply_meta(value.get("meta"))
        return file
    record = {}
    for key, item in value.items():
        record[key] = _hydrate(item, parts, depth + 1)
    return record


async def read_multipart(request: Request, limits: MultipartLimits) -> tuple[Any, list[InputFile]]:
    """The task input of a multipart call and its files (the caller closes them); raises
    :class:`UploadRefused` with the answer otherwise."""
    content_type, options = parse_options_header(request.header("content-type") or "")
    boundary = options.get(b"boundary")
    if content_type.lower() != b"multipart/form-data" or not boundary:
        raise _invalid()
    parts = _Parts(limits)
    try:
        try:
            parser = MultipartParser(boundary, parts.callbacks())  # type: ignore[arg-type]
            async for chunk in request.body_chunks(limit=None):
                parser.write(chunk)
            parser.finalize()
        except (MultipartParseError, ValueError):
            raise _invalid() from None
        except BodyTimeout:
            raise UploadRefused(408, "Request Timeout", "REQUEST_TIMEOUT") from None
        except BodyError:
            raise
        if not parts.ended:
            raise _invalid()
        if parts.manifest is None:
            raise UploadRefused(400, "Missing manifest", "MISSING_MANIFEST")
        try:
            manifest = serializer.loads(parts.manifest) if parts.manifest else UNDEFINED
        except SerializationError:
            raise _invalid("Invalid manifest") from None
        if not isinstance(manifest, dict):
            raise UploadRefused(400, "Missing manifest", "MISSING_MANIFEST")
        task_input = _hydrate(manifest.get("input", UNDEFINED), parts)
        for file in parts.files.values():
            if file._expected and not file._connected:
                # a 500 says only "Internal Error", as Runner sanitises every 500
                raise UploadRefused(500, "Internal Error", "MISSING_FILE_PART")
    except BaseException:
        for file in parts.files.values():
            file.close()
        raise
    return task_input, list(parts.files.values())
