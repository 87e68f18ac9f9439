"""The exact position codec: the kept positions themselves, Golomb-Rice gap coded (no false flips).

Codec header: empty. Body: one position list as written by `deltamask.codecs.rice.encode_set`.
"""
import numpy as np

from deltamask.codecs import rice
from deltamask.codecs.base import Codec, FlipUpdate, Frame, pack_frame
from deltamask.errors import PayloadError


class Exact(Codec):
    name, codec_id = "exact", 5

    def _encode(self, positions: np.ndarray, d: int) -> bytes:
        return pack_frame(self.codec_id, d, len(positions), b"", rice.encode_set(positions, d))

    def _decode(self, frame: Frame) -> "PositionsUpdate":
        if frame.header:
            raise PayloadError("exact payload carries an unexpected codec header")
        positions, end = rice.decode_set(frame.body, 0, frame.d)
        if end != len(frame.body) or len(positions) != frame.count:
            raise PayloadError("exact payload garbled: position list does not match the frame")
        return PositionsUpdate(frame.d, positions)


class PositionsUpdate(FlipUpdate):
    """Flips at an explicit sorted list of positions."""

    def __init__(self, d: int, positions: np.ndarray) -> None:
        self.d, self.count, self.positions = d, len(positions), positions

    def flips(self, start: int, stop: int) -> np.ndarray:
        lo, hi = np.searchsorted(self.positions, [start, stop])
        out = np.zeros(stop - start, dtype=bool)
        out[self.positions[lo:hi] - start] = True
        return out

    def flip_positions(self, chunk: int = 1 << 20) -> np.ndarray:
        return self.positions
