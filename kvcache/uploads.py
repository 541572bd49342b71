"""Reassembly of streamed frames on a cache node, within a memory budget.

A ``PutStream`` call sends frames as chunks (`proto/kvcache.proto`): a frame
that fits travels as one chunk, a larger one as successive chunks of the same
key. Every number in a chunk (``total``, ``offset``, the data's length) comes
from the caller, so none of it may decide an allocation unchecked. The rules:

- a frame's ``total`` is at most the node's per-block maximum (itself never
  above the node's capacity), else the stream fails with INVALID_ARGUMENT;
- a stream has at most one frame in progress: chunks of a frame arrive in
  order (``offset`` equal to the bytes received so far), with the same
  ``total``, never beyond it, and a chunk of another key before the frame is
  whole is refused (INVALID_ARGUMENT);
- the buffer of a frame in progress is allocated once, when its first chunk
  arrives, and only after its bytes are reserved in the node-wide
  `UploadBudget`; when the budget cannot hold it the stream fails with
  RESOURCE_EXHAUSTED (a retryable refusal);
- the reservation is released when the frame is complete (the store then
  accounts for it) or when the stream ends, breaks or is refused
  (`StreamAssembler.close`, called in a ``finally``).

So the memory a node spends on uploads in progress never exceeds its budget,
whatever callers claim. Who uses it: `kvcache.server`. Not here: the frame's
own check (clients check frames when they read them).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvcache.errors import InvalidRequest, OverBudget
from kvcache.framing import Buffer

#: Longest block key a node accepts (a 32-byte `BlockKey` plus a 16-byte tenant scope).
MAX_KEY_BYTES = 64


def check_key(key: bytes) -> None:
    """Refuse a key a node will not store or look up.

    Raises:
        InvalidRequest: empty, or longer than `MAX_KEY_BYTES`.
    """
    if not key or len(key) > MAX_KEY_BYTES:
        raise InvalidRequest("key", f"block keys are 1 to {MAX_KEY_BYTES} bytes, got {len(key)}")


class UploadBudget:
    """Bytes a node may hold in frames still being uploaded, over all streams.

    Args:
        limit_bytes: the budget.
    """

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.used_bytes = 0

    def reserve(self, size: int) -> None:
        """Reserve `size` bytes.

        Raises:
            OverBudget: the budget cannot hold them now.
        """
        if self.used_bytes + size > self.limit_bytes:
            raise OverBudget(
                "budget",
                f"{size} bytes of upload do not fit: {self.used_bytes} of {self.limit_bytes} in use",
            )
        self.used_bytes += size

    def release(self, size: int) -> None:
        """Give back bytes reserved by `reserve`."""
        self.used_bytes -= size


@dataclass(slots=True)
class _Partial:
    key: bytes
    buffer: bytearray
    received: int


class StreamAssembler:
    """Turns the chunks of one ``PutStream`` into whole frames.

    Args:
        budget: the node-wide upload budget.
        max_block_bytes: largest frame accepted.
    """

    def __init__(self, budget: UploadBudget, max_block_bytes: int) -> None:
        self._budget = budget
        self._max = max_block_bytes
        self._partial: _Partial | None = None

    @property
    def pending_bytes(self) -> int:
        """Bytes reserved by the frame in progress (0 when none)."""
        return 0 if self._partial is None else len(self._partial.buffer)

    def add(self, key: bytes, total: int, offset: int, data: bytes) -> tuple[bytes, Buffer] | None:
        """Take one chunk.

        Args:
            key: the chunk's block key.
            total: the frame's length the caller claims.
            offset: where the chunk's data goes in the frame.
            data: the chunk's bytes.

        Returns:
            (key, frame) when the chunk completes a frame, else None.

        Raises:
            InvalidRequest: the chunk breaks a rule (see the module docstring).
            OverBudget: the frame's buffer does not fit the budget now.
        """
        partial = self._partial
        if partial is None:
            check_key(key)
            if total > self._max:
                raise InvalidRequest("total", f"a frame of {total} bytes exceeds the node's {self._max}-byte maximum")
            if offset != 0:
                raise InvalidRequest("offset", f"the first chunk of a frame starts at offset {offset}, not 0")
            if len(data) > total:
                raise InvalidRequest("length", f"{len(data)} bytes of data for a frame of {total}")
            if len(data) == total:
                return key, data
            self._budget.reserve(total)
            # NOTE: the one allocation of this frame, checked and reserved above.
            buffer = bytearray(total)
            buffer[: len(data)] = data
            self._partial = _Partial(key, buffer, len(data))
            return None
        if key != partial.key:
            raise InvalidRequest("order", "a chunk of another block arrived before the previous one was whole")
        if total != len(partial.buffer):
            raise InvalidRequest("total", f"total changed from {len(partial.buffer)} to {total} within a frame")
        if offset != partial.received:
            raise InvalidRequest("offset", f"chunk at offset {offset}, expected {partial.received}")
        if not data or offset + len(data) > total:
            raise InvalidRequest("length", f"{len(data)} bytes at offset {offset} do not fit a frame of {total}")
        partial.buffer[offset : offset + len(data)] = data
        partial.received += len(data)
        if partial.received < total:
            return None
        self._partial = None
        self._budget.release(total)
        return partial.key, partial.buffer

    def close(self) -> bool:
        """Drop the frame in progress, if any, and release its reservation.

        Returns:
            Whether a frame was still incomplete (a truncated upload).
        """
        partial, self._partial = self._partial, None
        if partial is None:
            return False
        self._budget.release(len(partial.buffer))
        return True
