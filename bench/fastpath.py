"""EXPERIMENTS (bench only, not part of the library): the session's write path.

The Data-frame fast path that this module used to prototype (hand-built Data frames, in-place
frame parsing) now lives in ``pytunnel.protocol.frames``; what remains are two experiments
on the writer, measured in docs/performance.md:

* ``install_inline_write()``: when the session's writer task is idle, ``Session._kick_writer``
  tries one *non-blocking* ``send()`` of the queued frames straight on the socket (trio
  ``SocketStream`` only) and leaves the rest to the writer task. It never blocks or awaits, and
  frame order is preserved because it only runs while the writer is parked with nothing in
  flight. It reaches into trio's private socket attribute, which is why it is not in the
  library.
* ``install_batching_writer()``: the writer collects frames for a few scheduling rounds before
  each transport write.

``bench_session.py --inline-write`` / ``--batch-writer`` run the patched session cases next to
the unpatched ones in the same run.
"""

from __future__ import annotations

from typing import Any

import trio

# --------------------------------------------------------------------------- inline write


def _kick_writer(self: Any) -> None:
    """Try to hand queued frames to the kernel right now; the writer task does the rest.

    Only while the writer task is parked with nothing in flight (not inside
    ``transport.send_all`` and not already woken), so frame order is preserved.
    """
    if not getattr(self, "_writing", True) and not self._write_event.is_set() and not self.closed:
        raw = getattr(getattr(self._transport, "socket", None), "_sock", None)
        mux = self._mux
        if raw is not None and mux.bytes_to_send:
            data = mux.data_to_send()
            try:
                sent = raw.send(data)
            except OSError:  # incl. BlockingIOError; the writer task reports real errors
                sent = 0
            if sent:
                self.bytes_written += sent
            if sent < len(data):
                with memoryview(data) as view, view[sent:] as rest:
                    mux._out[:0] = rest  # back to the front of the queue, before newer frames
            else:
                self._drain_lot.unpark_all()
            if not mux.bytes_to_send:
                return
    self._write_event.set()


_original_inline: dict[str, Any] = {}


def install_inline_write() -> None:
    from pytunnel import _session

    if _original_inline:
        return
    _original_inline["_kick_writer"] = _session.Session._kick_writer
    _session.Session._kick_writer = _kick_writer  # type: ignore[method-assign]


def uninstall_inline_write() -> None:
    from pytunnel import _session

    if not _original_inline:
        return
    _session.Session._kick_writer = _original_inline.pop("_kick_writer")  # type: ignore[method-assign]


# --------------------------------------------------------------------------- batching writer

#: Stop collecting once this much is queued (keep it <= write_buffer_high: senders park above it).
BATCH_TARGET = 256 * 1024
#: At most this many extra scheduling rounds per transport write.
BATCH_ROUNDS = 8


async def _batching_writer(self: Any) -> None:
    """Session._writer (as in src at the time of writing), plus: before taking the queued
    frames, yield to the scheduler while that lets producers queue more, up to BATCH_TARGET
    bytes or BATCH_ROUNDS rounds. One send()/recv() then carries several frames instead of
    about one, which is what the single-stream loopback case lacks. If a round adds nothing
    (producers idle or parked) the frames go out at once, so the added latency is one
    scheduling round at most when the session is quiet."""

    mux = self._mux
    transport = self._transport
    with self._writer_scope:
        try:
            while True:
                if not mux.bytes_to_send:
                    self._drain_lot.unpark_all()
                    self._write_event = trio.Event()
                    await self._write_event.wait()
                    continue
                for _ in range(BATCH_ROUNDS):
                    before = mux.bytes_to_send
                    if before >= BATCH_TARGET:
                        break
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    if mux.bytes_to_send == before:
                        break
                data = mux.data_to_send()
                self._drain_lot.unpark_all()
                self._writing = True
                try:
                    await transport.send_all(data)
                finally:
                    self._writing = False
                self.bytes_written += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._terminate(exc)


_original_batch: dict[str, Any] = {}


def install_batching_writer() -> None:
    from pytunnel import _session

    if _original_batch:
        return
    _original_batch["_writer"] = _session.Session._writer
    _session.Session._writer = _batching_writer  # type: ignore[method-assign]


def uninstall_batching_writer() -> None:
    from pytunnel import _session

    if not _original_batch:
        return
    _session.Session._writer = _original_batch.pop("_writer")  # type: ignore[method-assign]
