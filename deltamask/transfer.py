"""Blobs in chunks: how the global theta and client updates cross a message-size limit, resumably.

A blob travels as chunks of at most CHUNK_BYTES, each tagged with its byte offset; the receiver knows
the total length and SHA-256 up front, checks every offset is the next one expected, and checks the
digest at the end. A receiver that lost the connection asks again from `received` bytes on.
No network here: the gRPC layers in server/ and edge_client/ move the chunks.
"""
import hashlib
from typing import Iterator, Tuple

from deltamask.errors import PayloadError

CHUNK_BYTES = 1 << 20  # 1 MiB, well under gRPC's default 4 MiB message limit


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def split(data: bytes, offset: int = 0, size: int = CHUNK_BYTES) -> Iterator[Tuple[int, bytes]]:
    """(offset, piece) pairs covering data[offset:]; one empty piece for an empty remainder."""
    if not 0 <= offset <= len(data):
        raise PayloadError(f"offset {offset} outside a blob of {len(data)} bytes")
    if offset == len(data):
        yield offset, b""
        return
    view = memoryview(data)
    for lo in range(offset, len(data), size):
        yield lo, bytes(view[lo:lo + size])


class Assembler:
    """Collects chunks of one blob of known length and digest; `result()` checks it is whole and intact."""

    def __init__(self, total_length: int, sha256: str, limit: int) -> None:
        if total_length > limit:
            raise OverflowError(f"blob of {total_length} bytes is over the limit of {limit} bytes")
        self.total_length, self.sha256 = int(total_length), sha256
        self._parts = bytearray()

    @property
    def received(self) -> int:
        return len(self._parts)

    def add(self, offset: int, piece: bytes) -> None:
        if offset != len(self._parts):
            raise PayloadError(f"chunk at offset {offset}, expected {len(self._parts)}")
        if len(self._parts) + len(piece) > self.total_length:
            raise OverflowError(f"blob longer than its declared {self.total_length} bytes")
        self._parts += piece

    def result(self) -> bytes:
        if len(self._parts) != self.total_length:
            raise PayloadError(f"blob ended at {len(self._parts)} of {self.total_length} bytes")
        data = bytes(self._parts)
        if sha256_hex(data) != self.sha256:
            raise PayloadError("blob SHA-256 does not match the one declared")
        return data
