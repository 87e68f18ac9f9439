"""Dense weight updates, for the fine-tuning baselines: FedAvg at 32 bits a parameter, and EDEN at ~1.

A device that fine-tunes the masked layers' weights (instead of a mask over them) uploads its update
u = w_k - w_g of the same d weights, in the canonical order of the masks.

    float32  Codec header: empty. Body: the d values, float32 little-endian (32 bpp).
    eden     EDEN (Vargaftik et al., ICML 2022) at 1 bit a coordinate: the update, zero-padded to chunks of
             C = 2^c values, is rotated by the randomized Hadamard transform R = H D / sqrt(C) (D random
             signs drawn from `seed`); each chunk sends the signs of R u and one scale
             S = ||u||^2 / ||R u||_1, which makes the estimate unbiased in the rotation's randomness. The
             receiver computes R^-1 (S sign(R u)). Codec header: <QB seed, c; then one float32 scale a
             chunk. Body: the signs packed 8 a byte, least significant bit first (ceil(d / C) * C bits).
             EDEN rather than DRIVE (its biased 1-bit sibling) because FedAvg averages the updates of K
             devices: unbiased estimates' errors average out, biased ones do not.

The seed of EDEN's rotation is derived from the update itself and sent in the header (8 bytes), so the
encoder needs no shared state with the server. Decoding refuses non-finite values.
"""
import hashlib
import struct
from typing import Callable

import numpy as np

from deltamask.codecs.base import WEIGHTS, Codec, DecodedUpdate, Frame, pack_frame
from deltamask.errors import PayloadError

MAX_CHUNK_LOG2 = 16  # EDEN rotates chunks of at most 65,536 coordinates (1.02 bpp at MobileNetV2's d)
_EDEN = struct.Struct("<QB")


class WeightUpdate(DecodedUpdate):
    """A decoded dense update: `values` (float32, length d), computed when first read (so a weight update
    sent where a mask is expected is refused before any of that work). It carries no mask."""

    def __init__(self, d: int, values: Callable[[], np.ndarray]) -> None:
        self.d, self.count, self._compute, self._values = d, d, values, None

    @property
    def values(self) -> np.ndarray:
        if self._values is None:
            self._values = self._compute()
        return self._values

    def client_mask(self, reference: np.ndarray, start: int = 0) -> np.ndarray:
        raise PayloadError("a weight update carries no mask (a fine-tuning baseline's payload in a mask round)")


class Float32(Codec):
    name, codec_id, carries = "float32", 9, WEIGHTS

    def _encode(self, update: np.ndarray, d: int) -> bytes:
        return pack_frame(self.codec_id, d, d, b"", update.astype("<f4").tobytes())

    def _decode(self, frame: Frame) -> WeightUpdate:
        if frame.header or frame.count != frame.d or len(frame.body) != 4 * frame.d:
            raise PayloadError(f"float32 payload must hold exactly {frame.d} values and no header")
        def values() -> np.ndarray:
            out = np.frombuffer(frame.body, dtype="<f4").astype(np.float32)
            if not np.all(np.isfinite(out)):
                raise PayloadError("float32 payload holds values that are not finite")
            return out

        return WeightUpdate(frame.d, values)


def fwht(x: np.ndarray) -> np.ndarray:
    """The fast Walsh-Hadamard transform of each row of x (rows of a power-of-two length), unnormalised."""
    rows, n = x.shape
    h = 1
    while h < n:
        pairs = x.reshape(rows, n // (2 * h), 2, h)
        x = np.stack((pairs[:, :, 0] + pairs[:, :, 1], pairs[:, :, 0] - pairs[:, :, 1]), axis=2)
        h *= 2
    return x.reshape(rows, n)


def eden_chunk_log2(d: int) -> int:
    return min(MAX_CHUNK_LOG2, max(0, (int(d) - 1).bit_length()))


def _signs(seed: int, shape) -> np.ndarray:
    return np.where(np.random.default_rng(seed).random(shape) < 0.5, -1.0, 1.0)


class Eden(Codec):
    name, codec_id, carries = "eden", 10, WEIGHTS

    def _encode(self, update: np.ndarray, d: int) -> bytes:
        c = eden_chunk_log2(d)
        size = 1 << c
        chunks = -(-d // size)
        x = np.zeros(chunks * size, dtype=np.float64)
        x[:d] = update
        x = x.reshape(chunks, size)
        seed = int.from_bytes(hashlib.sha256(update.tobytes()).digest()[:8], "little")
        y = fwht(x * _signs(seed, x.shape)) / np.sqrt(size)
        l1 = np.abs(y).sum(1)
        scales = np.where(l1 > 0, (x * x).sum(1) / np.where(l1 > 0, l1, 1), 0.0).astype("<f4")
        header = _EDEN.pack(seed, c) + scales.tobytes()
        return pack_frame(self.codec_id, d, d, header, np.packbits(y.ravel() >= 0, bitorder="little").tobytes())

    def _decode(self, frame: Frame) -> WeightUpdate:
        d = frame.d
        c = eden_chunk_log2(d)
        size = 1 << c
        chunks = -(-d // size)
        if frame.count != d or len(frame.header) != _EDEN.size + 4 * chunks:
            raise PayloadError(f"eden header must hold a seed, the chunk size and {chunks} scales for d = {d}")
        seed, declared = _EDEN.unpack_from(frame.header)
        if declared != c:
            raise PayloadError(f"eden payload declares chunks of 2^{declared}, expected 2^{c} for d = {d}")
        scales = np.frombuffer(frame.header, dtype="<f4", offset=_EDEN.size).astype(np.float64)
        if not np.all(np.isfinite(scales)) or np.any(scales < 0):
            raise PayloadError("eden scales must be finite and non-negative")
        if len(frame.body) != chunks * size // 8 + (1 if chunks * size % 8 else 0):
            raise PayloadError(f"eden body is {len(frame.body)} bytes, expected {-(-chunks * size // 8)}")
        def values() -> np.ndarray:
            bits = np.unpackbits(np.frombuffer(frame.body, np.uint8), bitorder="little")[:chunks * size]
            y = (2.0 * bits.reshape(chunks, size) - 1.0) * scales[:, None]
            x = fwht(y) / np.sqrt(size) * _signs(seed, y.shape)
            return x.ravel()[:d].astype(np.float32)

        return WeightUpdate(d, values)
