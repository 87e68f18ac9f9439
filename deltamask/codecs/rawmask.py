"""The FedPM baseline: the client's whole binary mask, 1 bit a parameter, then DEFLATE; and FedMask's
`bitmask`, the same mask without DEFLATE (exactly 1 bit a parameter).

Codec header: empty. Body: zlib stream of the mask packed 8 positions a byte, least significant bit
first (ceil(d/8) bytes once inflated). Inflation stops at that size, so a DEFLATE bomb is refused.
"""
import zlib

import numpy as np

from deltamask.codecs.base import MASK, Codec, DecodedUpdate, Frame, pack_frame
from deltamask.errors import PayloadError


class RawMask(Codec):
    name, codec_id, carries = "rawmask", 6, MASK

    def _encode(self, mask: np.ndarray, d: int) -> bytes:
        packed = np.packbits(mask, bitorder="little").tobytes()
        return pack_frame(self.codec_id, d, int(np.count_nonzero(mask)), b"", zlib.compress(packed, 6))

    def _decode(self, frame: Frame) -> "MaskUpdate":
        if frame.header:
            raise PayloadError(f"{self.name} payload carries an unexpected codec header")
        bits = np.frombuffer(self._inflate(frame), dtype=np.uint8)
        if frame.d % 8 and bits[-1] >> (frame.d % 8):
            raise PayloadError(f"{self.name} payload has bits set past position d")
        ones = int(np.unpackbits(bits).sum())
        if ones != frame.count:
            raise PayloadError(f"{self.name} payload holds {ones} ones, the frame says {frame.count}")
        return MaskUpdate(frame.d, frame.count, bits)

    def _inflate(self, frame: Frame) -> bytes:
        size = (frame.d + 7) // 8
        inflater = zlib.decompressobj()
        try:
            packed = inflater.decompress(frame.body, size)
        except zlib.error as exc:
            raise PayloadError(f"rawmask payload garbled: {exc}") from exc
        if len(packed) != size or inflater.unconsumed_tail or not inflater.eof or inflater.unused_data:
            raise PayloadError(f"rawmask payload does not inflate to exactly {size} bytes")
        return packed


class BitMask(RawMask):
    """FedMask's upload: the whole binary mask at exactly 1 bit a parameter, no entropy coding.

    Codec header: empty. Body: the mask packed 8 positions a byte, least significant bit first."""

    name, codec_id = "bitmask", 8

    def _encode(self, mask: np.ndarray, d: int) -> bytes:
        packed = np.packbits(mask, bitorder="little").tobytes()
        return pack_frame(self.codec_id, d, int(np.count_nonzero(mask)), b"", packed)

    def _inflate(self, frame: Frame) -> bytes:
        if len(frame.body) != (frame.d + 7) // 8:
            raise PayloadError(f"bitmask payload is {len(frame.body)} bytes, expected {(frame.d + 7) // 8}")
        return frame.body

class MaskUpdate(DecodedUpdate):
    """A whole client mask, kept packed (d/8 bytes); the reference mask plays no part."""

    def __init__(self, d: int, count: int, packed: np.ndarray) -> None:
        self.d, self.count, self.packed = d, count, packed

    def client_mask(self, reference: np.ndarray, start: int = 0) -> np.ndarray:
        stop = start + len(reference)
        first, last = start // 8, (stop + 7) // 8
        bits = np.unpackbits(self.packed[first:last], bitorder="little")
        return bits[start - 8 * first: stop - 8 * first].astype(bool)
