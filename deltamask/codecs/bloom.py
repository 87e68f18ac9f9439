"""The DeepReduce baseline: a Bloom filter over the same kept delta positions, with DeepReduce's P0 policy.

DeepReduce (Kostopoulou et al., 2021) compresses a sparse tensor's index set with a Bloom filter; the
DeltaMask paper keeps only that index coding (a mask has no values to code) under the P0 policy: the
receiver asks the filter about every position and takes every "yes", false positives included, as a
flip. The filter has BITS_PER_KEY bits a position, the space of BFuse8 (about 9 bits a key), and the
number of hash functions that is optimal for that space, k = round(ln 2 * m / n); its false-positive
rate, (1 - e^(-k n / m))^k ~ 1.3%, is what the comparison with the fuse filters (2^-8 ~ 0.39% in the
same space) is about.

Hashing: h = xor_murmur64(position + seed) (the fuse filters' hash); h1 = low 32 bits, h2 = high 32 bits
| 1; the i-th probe is (h1 + i h2) mod m (double hashing, Kirsch-Mitzenmacher).

Codec header: <QQB  seed, m (bits in the filter), k. Body: the m bits packed 8 a byte, least significant
bit first (ceil(m/8) bytes).
"""
import math
import struct

import numpy as np

from deltamask.codecs.base import Codec, FlipUpdate, Frame, pack_frame
from deltamask.codecs.filters import CHUNK, EmptyUpdate, _murmur
from deltamask.errors import PayloadError

BITS_PER_KEY = 9
SEED = 0x5EED_B100
_HEADER = struct.Struct("<QQB")
_LOW32 = np.uint64(0xFFFFFFFF)


def bloom_shape(n: int, bits_per_key: int = BITS_PER_KEY):
    """(m, k) for n keys: m = bits_per_key * n rounded up to a byte (at least 64), k optimal for m / n."""
    m = max(64, -(-bits_per_key * n // 8) * 8)
    return m, max(1, round(math.log(2) * m / max(n, 1)))


def _probes(keys: np.ndarray, seed: int, m: int, k: int) -> np.ndarray:
    """Bit indices (k x len(keys), uint64) the keys set or test."""
    h = _murmur(keys.astype(np.uint64), seed)
    h1, h2 = h & _LOW32, (h >> np.uint64(32)) | np.uint64(1)
    return (h1[None, :] + np.arange(k, dtype=np.uint64)[:, None] * h2[None, :]) % np.uint64(m)


class Bloom(Codec):
    name, codec_id = "bloom", 7
    false_positive_rate = (1 - math.exp(-round(math.log(2) * BITS_PER_KEY) / BITS_PER_KEY)) \
        ** round(math.log(2) * BITS_PER_KEY)

    def _encode(self, positions: np.ndarray, d: int) -> bytes:
        n = len(positions)
        if n == 0:
            return pack_frame(self.codec_id, d, 0, b"", b"")
        m, k = bloom_shape(n)
        bits = np.zeros(m, dtype=bool)
        bits[_probes(positions, SEED, m, k).ravel().view(np.int64)] = True
        return pack_frame(self.codec_id, d, n, _HEADER.pack(SEED, m, k), np.packbits(bits, bitorder="little").tobytes())

    def _decode(self, frame: Frame) -> FlipUpdate:
        if frame.count == 0:
            if frame.header or frame.body:
                raise PayloadError("bloom payload with no positions must be empty")
            return EmptyUpdate(frame.d)
        if len(frame.header) != _HEADER.size:
            raise PayloadError(f"bloom header is {len(frame.header)} bytes, expected {_HEADER.size}")
        seed, m, k = _HEADER.unpack(frame.header)
        if (m, k) != bloom_shape(frame.count):
            raise PayloadError(f"bloom header declares m = {m}, k = {k} for {frame.count} keys, expected "
                               f"{bloom_shape(frame.count)}")
        if len(frame.body) != m // 8:
            raise PayloadError(f"bloom body is {len(frame.body)} bytes, expected {m // 8}")
        return BloomUpdate(frame.d, frame.count, seed, m, k,
                           np.unpackbits(np.frombuffer(frame.body, np.uint8), bitorder="little").astype(bool))


class BloomUpdate(FlipUpdate):
    """P0: a flip wherever all k probed bits are set (true and false positives alike)."""

    def __init__(self, d: int, count: int, seed: int, m: int, k: int, bits: np.ndarray) -> None:
        self.d, self.count, self.seed, self.m, self.k, self.bits = d, count, seed, m, k, bits

    def flips(self, start: int, stop: int) -> np.ndarray:
        out = np.empty(stop - start, dtype=bool)
        for lo in range(start, stop, CHUNK):
            hi = min(lo + CHUNK, stop)
            probes = _probes(np.arange(lo, hi, dtype=np.uint64), self.seed, self.m, self.k)
            out[lo - start:hi - start] = self.bits[probes.view(np.int64)].all(axis=0)
        return out
