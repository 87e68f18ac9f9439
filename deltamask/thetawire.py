"""The wire form of theta: exact integer thresholds (what both sides sample from), compactly coded.

theta travels as thresholds t_i = round(theta_i * 2**24) (see `deltamask.sampling`). Under the mode
formula theta takes few distinct values (counts over K clients), so the thresholds are coded as a
palette plus, for every value but the most frequent, the positions that hold it: each set Rice coded
among the positions not yet assigned, rarest value first. That costs close to the empirical entropy of
the values (the log of a multinomial coefficient), e.g. ~0.5 bits a parameter when 90% of positions
agree. With more than MAX_LEVELS distinct values it falls back to DEFLATE over the raw thresholds.

    offset  size  field (little-endian)
    0       4     magic b"DMTH"
    4       1     version (1)
    5       1     layout: 0 = levels, 1 = raw
    6       2     reserved, zero
    8       8     d
    16      4     V, the number of palette values (levels) or 0 (raw)
    20      4*V   palette: the fill value first, then the value of each coded set in coding order
    ...           levels: V-1 position lists (`deltamask.codecs.rice`), raw: zlib of d u32 thresholds
    end-4   4     CRC-32 of every byte before it

The digest a task carries is the SHA-256 of these bytes (`theta_digest`).
"""
import hashlib
import struct
import zlib
from typing import Optional

import numpy as np

from deltamask.codecs import rice
from deltamask.errors import PayloadError
from deltamask.sampling import ONE

MAGIC = b"DMTH"
VERSION = 1
LEVELS, RAW = 0, 1
MAX_LEVELS = 256
_HEAD = struct.Struct("<4sBBHQI")


def encode_theta(thresholds: np.ndarray) -> bytes:
    """Code uint32 thresholds in [0, 2**24] (from `sampling.theta_to_thresholds`)."""
    t = np.asarray(thresholds)
    if t.ndim != 1 or t.dtype != np.uint32 or not len(t):
        raise ValueError("encode_theta takes a non-empty 1-D uint32 array of thresholds")
    if int(t.max()) > ONE:
        raise ValueError(f"thresholds must lie in [0, {ONE}]")
    d = len(t)
    fill = _most_frequent(t)
    others = np.flatnonzero(t != fill)  # sorted positions that hold another value
    values, counts, value_index = _histogram(t[others])
    if len(values) + 1 > MAX_LEVELS:
        body = zlib.compress(t.astype("<u4").tobytes(), 6)
        return _seal(_HEAD.pack(MAGIC, VERSION, RAW, 0, d, 0) + body)
    order = np.argsort(counts, kind="stable")  # rarest first
    level_of_value = np.empty(len(values), dtype=np.uint8)
    level_of_value[order] = np.arange(len(values))
    levels = level_of_value[value_index]  # each other position's coding level
    palette = np.concatenate([[fill], values[order]]).astype("<u4")
    parts = [_HEAD.pack(MAGIC, VERSION, LEVELS, 0, d, len(palette)), palette.tobytes()]
    for level in range(len(values)):
        # rank among the positions not yet coded = position - (positions of lower levels before it)
        at = np.flatnonzero(levels == level)
        ranks = others[at] - np.cumsum(levels < level)[at]
        parts.append(rice.encode_set(ranks, d - int(counts[order[:level]].sum())))
    return _seal(b"".join(parts))


def decode_theta(data: bytes, d: Optional[int] = None) -> np.ndarray:
    """The uint32 thresholds a theta message holds; PayloadError for anything malformed."""
    data = bytes(data)
    if len(data) < _HEAD.size + 4:
        raise PayloadError(f"theta message truncated: {len(data)} bytes")
    magic, version, layout, reserved, size, levels = _HEAD.unpack_from(data)
    if magic != MAGIC or version != VERSION or reserved:
        raise PayloadError(f"not a version-{VERSION} theta message (magic {magic!r}, version {version})")
    if zlib.crc32(data[:-4]) != struct.unpack_from("<I", data, len(data) - 4)[0]:
        raise PayloadError("theta message garbled or truncated: CRC-32 mismatch")
    if d is not None and size != d:
        raise PayloadError(f"theta message is for d = {size}, expected d = {d}")
    if not 0 < size < 1 << 40:
        raise PayloadError(f"theta message declares d = {size}")
    body = data[_HEAD.size:-4]
    if layout == RAW:
        return _decode_raw(body, size)
    if layout != LEVELS or not 1 <= levels <= MAX_LEVELS or len(body) < 4 * levels:
        raise PayloadError(f"theta message has layout {layout} with {levels} levels")
    palette = np.frombuffer(body, dtype="<u4", count=levels).astype(np.uint32)
    if int(palette.max()) > ONE:
        raise PayloadError("theta message holds a threshold above 2**24")
    out = np.full(size, palette[0], dtype=np.uint32)
    assigned = np.zeros(0, dtype=np.int64)
    offset = 4 * levels
    for value in palette[1:]:
        ranks, offset = rice.decode_set(body, offset, size - len(assigned))
        # the r-th free position is r plus the number of assigned positions before it
        positions = ranks + np.searchsorted(assigned - np.arange(len(assigned)), ranks, side="right")
        out[positions] = value
        assigned = np.sort(np.concatenate([assigned, positions]), kind="stable")
    if offset != len(body):
        raise PayloadError("theta message has trailing bytes")
    return out


def theta_digest(data: bytes) -> str:
    """Hex SHA-256 of a theta message: what a task names and an upload is checked against."""
    return hashlib.sha256(data).hexdigest()


def _decode_raw(body: bytes, d: int) -> np.ndarray:
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(body, 4 * d)
    except zlib.error as exc:
        raise PayloadError(f"theta message garbled: {exc}") from exc
    if len(raw) != 4 * d or inflater.unconsumed_tail or not inflater.eof:
        raise PayloadError(f"theta message does not inflate to {d} thresholds")
    t = np.frombuffer(raw, dtype="<u4").astype(np.uint32)
    if int(t.max()) > ONE:
        raise PayloadError("theta message holds a threshold above 2**24")
    return t


def _most_frequent(t: np.ndarray) -> int:
    """The most frequent value, found on a strided sample (any value would be correct; the most
    frequent one makes the message smallest)."""
    sample = t[:: max(1, len(t) // 65536)]
    values, counts = np.unique(sample, return_counts=True)
    return int(values[np.argmax(counts)])


def _histogram(values: np.ndarray):
    """(sorted distinct values, their counts, each value's index among them), through a lookup table
    when the values are few (they are thresholds <= 2**24) instead of sorting them all."""
    distinct = np.unique(values[:: max(1, len(values) // 4096)])
    if len(distinct) < 255:  # 255 marks "not in the sample"
        table = np.full(ONE + 1, 255, dtype=np.uint8)
        table[distinct] = np.arange(len(distinct))
        index = table[values]
        if not (index == 255).any():  # the sample saw every value
            return distinct, np.bincount(index, minlength=len(distinct)), index
    distinct, index, counts = np.unique(values, return_inverse=True, return_counts=True)
    return distinct, counts, index.reshape(-1)


def _seal(data: bytes) -> bytes:
    return data + struct.pack("<I", zlib.crc32(data))
