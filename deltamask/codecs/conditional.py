"""Conditional codecs: positions coded within the set both sides know is undecided.

Both the device and the coordinator hold the round's theta_g. A flip the KL ranking keeps lies almost always
where theta_g is undecided (0 < theta < 1): at a decided position the reference mask equals any sample, so
no delta can arise there unless the device's own theta moved off 0 or 1. The undecided set U is known to
both sides, a few percent of d after the first rounds. A conditional codec codes each kept position by its
rank within U (with the inner codec over a universe of |U| instead of d) and the rare decided position in
an escape list (Golomb-Rice over d). A filter built over ranks is queried |U| times instead of d, so it
makes d/|U| times fewer false flips and decodes that much faster.

Codec header: three LEB128 varints, |U|, the inner count (positions coded by rank) and the inner codec
header's length, then the inner codec header. Body: the escape list (`rice.encode_set` over d) when the
frame's count exceeds the inner count, then the inner codec's body over ranks 0..|U|-1. A few bytes more
than the plain codec when nothing is escaped. A payload decoded against another theta has another |U|:
refused.
"""
import numpy as np

from deltamask.codecs import rice
from deltamask.codecs.base import Codec, FlipUpdate, Frame, check_positions, pack_frame, read_frame
from deltamask.errors import PayloadError
from deltamask.sampling import ONE



def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_varint(buf: bytes, at: int):
    n = shift = 0
    while True:
        if at >= len(buf) or shift > 63:
            raise PayloadError("conditional payload garbled: a length runs off its header")
        byte = buf[at]
        n, at, shift = n | (byte & 0x7F) << shift, at + 1, shift + 7
        if not byte & 0x80:
            return n, at


def undecided(thresholds: np.ndarray) -> np.ndarray:
    """Sorted positions where theta_g lies strictly between 0 and 1 (int64)."""
    t = np.asarray(thresholds)
    return np.flatnonzero((t > 0) & (t < ONE))


class Conditional(Codec):
    """`inner` (a flip codec) over ranks within the undecided set, plus an escape list."""

    conditional = True

    def __init__(self, inner: Codec, codec_id: int) -> None:
        self.inner, self.codec_id = inner, codec_id
        self.name = f"{inner.name}-cond"
        self.false_positive_rate = inner.false_positive_rate

    def encode(self, values: np.ndarray, d: int, thresholds=None) -> bytes:
        if thresholds is None or len(thresholds) != d:
            raise ValueError(f"{self.name} encodes against the round's theta: pass its {d} thresholds")
        positions = check_positions(values, d)
        u = undecided(thresholds)
        ranks = np.searchsorted(u, positions)
        inside = np.zeros(len(positions), dtype=bool)
        known = ranks < len(u)
        inside[known] = u[ranks[known]] == positions[known]
        inner = read_frame(self.inner.encode(ranks[inside], max(len(u), 1)))
        header = _varint(len(u)) + _varint(inner.count) + _varint(len(inner.header)) + inner.header
        escapes = positions[~inside]
        body = (rice.encode_set(escapes, d) if len(escapes) else b"") + inner.body
        return pack_frame(self.codec_id, d, len(positions), header, body)

    def _encode(self, values, d):  # pragma: no cover - encode() is overridden: it needs theta
        raise NotImplementedError

    def decode_frame(self, frame: Frame, d: int, thresholds=None) -> "ConditionalUpdate":
        if frame.codec_id != self.codec_id or frame.d != d or frame.count > d:
            return super().decode_frame(frame, d)  # the base class's refusals, with their messages
        if thresholds is None or len(thresholds) != d:
            raise PayloadError(f"{self.name} payload decodes against the round's theta, which was not given")
        size, at = _read_varint(frame.header, 0)
        inner_count, at = _read_varint(frame.header, at)
        hlen, at = _read_varint(frame.header, at)
        if len(frame.header) != at + hlen or inner_count > frame.count:
            raise PayloadError(f"{self.name} payload garbled: codec header of the wrong length or count")
        u = undecided(thresholds)
        if size != len(u):
            raise PayloadError(f"{self.name} payload was coded against {size} undecided positions, this theta has "
                               f"{len(u)}: another theta")
        escapes, end = (rice.decode_set(frame.body, 0, d) if frame.count > inner_count
                        else (np.zeros(0, dtype=np.int64), 0))
        if inner_count + len(escapes) != frame.count:
            raise PayloadError(f"{self.name} payload garbled: position counts do not match the frame")
        inner = Frame(self.inner.codec_id, max(size, 1), inner_count, frame.header[at:], frame.body[end:])
        ranks = self.inner.decode_frame(inner, max(size, 1))
        if size == 0 and inner_count:
            raise PayloadError(f"{self.name} payload codes ranks in an empty undecided set")
        if len(escapes) and len(u) and np.isin(escapes, u).any():
            raise PayloadError(f"{self.name} payload escapes a position that is undecided")
        return ConditionalUpdate(d, frame.count, u, ranks, escapes)

    def _decode(self, frame):  # pragma: no cover - decode_frame() is overridden
        raise NotImplementedError


class ConditionalUpdate(FlipUpdate):
    """Flips at U[r] for every rank r the inner update answers yes to, and at the escaped positions."""

    def __init__(self, d: int, count: int, u: np.ndarray, ranks: FlipUpdate, escapes: np.ndarray) -> None:
        self.d, self.count, self.u, self.ranks, self.escapes = d, count, u, ranks, escapes

    def flips(self, start: int, stop: int) -> np.ndarray:
        out = np.zeros(stop - start, dtype=bool)
        lo, hi = np.searchsorted(self.u, [start, stop])
        if hi > lo:
            out[self.u[lo:hi][self.ranks.flips(int(lo), int(hi))] - start] = True
        a, b = np.searchsorted(self.escapes, [start, stop])
        out[self.escapes[a:b] - start] = True
        return out


__all__ = ["Conditional", "ConditionalUpdate", "undecided"]
