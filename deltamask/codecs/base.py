"""The update codec interface and the self-describing payload frame every codec writes.

Payload layout (all integers little-endian):

    offset  size  field
    0       4     magic b"DMSK"
    4       1     frame version (1)
    5       1     codec id (see `deltamask.codecs.CODECS`)
    6       2     reserved, zero
    8       8     d, the number of masked parameters
    16      8     count: positions coded (flip codecs) or ones in the mask (rawmask)
    24      4     H, bytes of the codec header
    28      H     codec header
    28+H    ...   body: a grayscale PNG (filters), a position list (exact), a DEFLATE stream (rawmask), a
                  packed mask (bitmask), a Bloom filter (bloom), float32 weights or EDEN's signs (weights)
    end-4   4     CRC-32 of every byte before it

Uplink bits are 8 x the whole payload, frame included.
"""
import abc
import struct
import zlib
from dataclasses import dataclass
from typing import ClassVar, Optional

import numpy as np

from deltamask.errors import PayloadError

MAGIC = b"DMSK"
FRAME_VERSION = 1
_FRAME = struct.Struct("<4sBBHQQI")
FRAME_OVERHEAD = _FRAME.size + 4  # fixed header + CRC trailer, in bytes
FLIPS, MASK, WEIGHTS = "flips", "mask", "weights"  # what a codec carries: positions to flip, the whole client
# mask, or a dense update of the same weights (the fine-tuning baselines)


@dataclass(frozen=True)
class Frame:
    """A payload split into its parts (CRC already checked)."""

    codec_id: int
    d: int
    count: int
    header: bytes
    body: bytes


def pack_frame(codec_id: int, d: int, count: int, header: bytes, body: bytes) -> bytes:
    head = _FRAME.pack(MAGIC, FRAME_VERSION, codec_id, 0, d, count, len(header))
    data = head + header + body
    return data + struct.pack("<I", zlib.crc32(data))


def read_frame(payload: bytes) -> Frame:
    """Split and check a payload; raises PayloadError for anything but a well-formed frame."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise PayloadError(f"payload must be bytes, got {type(payload).__name__}")
    payload = bytes(payload)
    if len(payload) < FRAME_OVERHEAD:
        raise PayloadError(f"payload truncated: {len(payload)} bytes, a frame needs at least {FRAME_OVERHEAD}")
    magic, version, codec_id, reserved, d, count, hlen = _FRAME.unpack_from(payload)
    if magic != MAGIC:
        raise PayloadError(f"not a DeltaMask payload (magic {magic!r})")
    if version != FRAME_VERSION or reserved:
        raise PayloadError(f"unsupported payload frame version {version} (expected {FRAME_VERSION})")
    (crc,) = struct.unpack_from("<I", payload, len(payload) - 4)
    if zlib.crc32(payload[:-4]) != crc:
        raise PayloadError("payload garbled or truncated: CRC-32 mismatch")
    if _FRAME.size + hlen > len(payload) - 4:
        raise PayloadError(f"payload truncated: codec header of {hlen} bytes does not fit")
    header = payload[_FRAME.size:_FRAME.size + hlen]
    return Frame(codec_id, d, count, header, payload[_FRAME.size + hlen:-4])


class DecodedUpdate(abc.ABC):
    """A decoded client update: rebuilds the client's mask from its reference mask, slice by slice."""

    d: int
    count: int

    @abc.abstractmethod
    def client_mask(self, reference: np.ndarray, start: int = 0) -> np.ndarray:
        """The client's mask at positions start .. start + len(reference) - 1, given the reference
        mask there (bool in, bool out)."""


class FlipUpdate(DecodedUpdate):
    """An update that lists positions to flip in the reference mask."""

    @abc.abstractmethod
    def flips(self, start: int, stop: int) -> np.ndarray:
        """Bool array over positions start .. stop-1: True where the client's mask differs from its
        reference (for filters: where the filter answers yes, false positives included)."""

    def client_mask(self, reference: np.ndarray, start: int = 0) -> np.ndarray:
        return np.logical_xor(reference, self.flips(start, start + len(reference)))

    def flip_positions(self, chunk: int = 1 << 20) -> np.ndarray:
        """All positions the decoder flips, as sorted int64 (memory O(chunk + flips))."""
        parts = [np.flatnonzero(self.flips(lo, min(lo + chunk, self.d))) + lo
                 for lo in range(0, self.d, chunk)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


class Codec(abc.ABC):
    """Encodes an update into a payload and decodes a payload back.

    `carries == FLIPS`: `encode` takes sorted unique positions (the kept delta set);
    `carries == MASK`: `encode` takes the client's whole bool mask;
    `carries == WEIGHTS`: `encode` takes a float32 update of the d weights (decodes to a `WeightUpdate`).
    """

    name: ClassVar[str]
    codec_id: ClassVar[int]
    carries: ClassVar[str] = FLIPS
    false_positive_rate: ClassVar[float] = 0.0

    conditional: ClassVar[bool] = False  # True: encode and decode against the round's theta (thresholds)

    def encode(self, values: np.ndarray, d: int, thresholds: Optional[np.ndarray] = None) -> bytes:
        """`thresholds`, the round's global theta, is what a conditional codec codes against; others ignore it."""
        d = _check_d(d)
        if self.carries == MASK:
            mask = np.asarray(values)
            if mask.shape != (d,):
                raise ValueError(f"{self.name} encodes a mask of shape ({d},), got {mask.shape}")
            return self._encode(mask.astype(bool, copy=False), d)
        if self.carries == WEIGHTS:
            update = np.asarray(values, dtype=np.float32)
            if update.shape != (d,) or not np.all(np.isfinite(update)):
                raise ValueError(f"{self.name} encodes {d} finite weights, got shape {update.shape}")
            return self._encode(update, d)
        return self._encode(check_positions(values, d), d)

    def decode(self, payload: bytes, d: int, thresholds: Optional[np.ndarray] = None) -> DecodedUpdate:
        """Decode a payload of this codec; PayloadError for anything wrong with it."""
        return self.decode_frame(read_frame(payload), d, thresholds)

    def decode_frame(self, frame: Frame, d: int, thresholds: Optional[np.ndarray] = None) -> DecodedUpdate:
        if frame.codec_id != self.codec_id:
            raise PayloadError(f"payload holds codec id {frame.codec_id}, not {self.name} ({self.codec_id})")
        if frame.d != d:
            raise PayloadError(f"payload is for d = {frame.d}, expected d = {d}")
        if frame.count > d:
            raise PayloadError(f"payload declares {frame.count} positions for d = {d}")
        return self._decode(frame)

    @abc.abstractmethod
    def _encode(self, values: np.ndarray, d: int) -> bytes: ...

    @abc.abstractmethod
    def _decode(self, frame: Frame) -> DecodedUpdate: ...

    def __repr__(self) -> str:
        return f"<codec {self.name} (id {self.codec_id})>"


def check_positions(positions: np.ndarray, d: int) -> np.ndarray:
    """Positions as sorted unique int64 in [0, d); ValueError otherwise."""
    positions = np.asarray(positions)
    if positions.ndim != 1 or (positions.size and not np.issubdtype(positions.dtype, np.integer)):
        raise ValueError(f"positions must be a 1-D integer array, got {positions.dtype} {positions.shape}")
    positions = positions.astype(np.int64, copy=False)
    if positions.size > 1 and not np.all(positions[1:] > positions[:-1]):
        positions = np.unique(positions)
    if positions.size and (positions[0] < 0 or positions[-1] >= d):
        raise ValueError(f"positions must lie in [0, {d}), got [{positions[0]}, {positions[-1]}]")
    return positions


def _check_d(d: int) -> int:
    d = int(d)
    if not 0 < d < 1 << 40:
        raise ValueError(f"d must be a positive number of parameters, got {d}")
    return d
