"""Seeded Bernoulli sampling that every party reproduces bit for bit, and mask digests.

The shared mask is drawn with a counter-based generator, never with torch or NumPy's Generator (their
streams are not promised across versions or platforms):

    u_i = splitmix64(seed + (i + 1) * 0x9E3779B97F4A7C15) >> 40      (a 24-bit uniform, i = 0 .. d-1)
    m_i = 1  iff  u_i < t_i

where splitmix64 is the standard finaliser (z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27;
z *= 0x94D049BB133111EB; z ^= z >> 31), so u_0, u_1, ... is exactly the output stream of a splitmix64
generator seeded with `seed`. `t_i = round(theta_i * 2**24)` is the integer threshold: theta travels as
thresholds (`deltamask.thetawire`), so P(m_i = 1) = t_i / 2**24 exactly on both sides. Any index range
can be drawn on its own, which lets the server shard the work.
"""
import hashlib
from typing import Optional

import numpy as np

GOLDEN = 0x9E3779B97F4A7C15
THRESHOLD_BITS = 24
ONE = 1 << THRESHOLD_BITS  # the threshold of theta = 1
PER_CLIENT = "per-client"  # each client's reference mask has its own seed (the project's default)
SHARED = "shared"  # the paper's single reference mask for everybody
REFERENCE_MODES = (PER_CLIENT, SHARED)
CHUNK = 1 << 16  # positions per vectorised step: small enough to stay in cache

_U = np.uint64
_MIX1, _MIX2 = _U(0xBF58476D1CE4E5B9), _U(0x94D049BB133111EB)
_S30, _S27, _S31, _S40 = _U(30), _U(27), _U(31), _U(40)


def uniforms(seed: int, start: int, stop: int) -> np.ndarray:
    """24-bit uniforms u_i for positions start <= i < stop, as uint32."""
    seed = _check_seed(seed)
    z = np.arange(start + 1, stop + 1, dtype=np.uint64)
    z *= _U(GOLDEN)
    z += _U(seed)
    t = np.empty_like(z)
    np.right_shift(z, _S30, out=t); z ^= t; z *= _MIX1
    np.right_shift(z, _S27, out=t); z ^= t; z *= _MIX2
    np.right_shift(z, _S31, out=t); z ^= t
    z >>= _S40
    return z.astype(np.uint32)


def sample_mask(thresholds: np.ndarray, seed: int, start: int = 0) -> np.ndarray:
    """The bool mask m_i = [u_i < t_i] for positions start .. start + len(thresholds) - 1."""
    thresholds = np.asarray(thresholds)
    out = np.empty(thresholds.shape[0], dtype=bool)
    for lo in range(0, out.shape[0], CHUNK):
        hi = min(lo + CHUNK, out.shape[0])
        np.less(uniforms(seed, start + lo, start + hi), thresholds[lo:hi], out=out[lo:hi])
    return out


def theta_to_thresholds(theta: np.ndarray) -> np.ndarray:
    """Integer thresholds round(theta * 2**24) in [0, 2**24], as uint32. theta must be finite."""
    theta = np.asarray(theta, dtype=np.float64)
    if not np.all(np.isfinite(theta)):
        raise ValueError("theta contains NaN or infinity")
    return np.rint(np.clip(theta, 0.0, 1.0) * ONE).astype(np.uint32)


def thresholds_to_theta(thresholds: np.ndarray, dtype=np.float32) -> np.ndarray:
    """theta = t / 2**24: the exact probability that `sample_mask` draws a 1."""
    return (np.asarray(thresholds, dtype=np.float64) / ONE).astype(dtype)


def round_seed(seed: int, round_index: int) -> int:
    """The public seed of round `round_index` of a federation started with `seed` (64 bits)."""
    return int.from_bytes(hashlib.sha256(f"deltamask/round/{seed}/{round_index}".encode()).digest()[:8], "little")


def client_seed(round_seed: int, client_id: str) -> int:
    """The seed of a client's own draws in a round, derived from the round seed and the client id:
    the first 8 bytes (little-endian) of SHA-256("deltamask/client-seed/v1" | round_seed u64 LE | id)."""
    material = b"deltamask/client-seed/v1" + _check_seed(round_seed).to_bytes(8, "little")
    digest = hashlib.sha256(material + client_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little")


def reference_seed(round_seed: int, client_id: str, mode: str = PER_CLIENT) -> int:
    """The seed of the reference mask a client's delta is taken against.

    per-client (default): the client's own seed, so the reference and the client's sample share their
    uniforms and differ only where theta moved (docs/design.md section 3.2); shared: the round seed, the same
    reference for everybody as in the paper.
    """
    if mode == PER_CLIENT:
        return client_seed(round_seed, client_id)
    if mode == SHARED:
        return _check_seed(round_seed)
    raise ValueError(f"unknown reference mode {mode!r}; expected one of {REFERENCE_MODES}")


def sample_seed(round_seed: int, client_id: str) -> int:
    """The seed of a client's own sample m_k (in both modes; in the shared mode it is then independent
    of the reference)."""
    return client_seed(round_seed, client_id)


DIGEST_CHUNK = 1 << 20  # positions a digest leaf covers (a multiple of 8): shards aligned to it hash apart


class MaskDigest:
    """SHA-256 over d (u64 LE) and the SHA-256 of each DIGEST_CHUNK positions of the mask, packed 8 positions
    a byte, least significant bit first (a two-level hash: a shard of aligned chunks hashes its own leaves,
    `chunk_digests`, and whoever holds all leaves combines them, `combine_digests`).

    Feed it the mask whole or in consecutive pieces whose lengths are multiples of 8 (the last piece
    excepted); the digest is the same either way.
    """

    def __init__(self, d: int) -> None:
        self.d, self._seen = int(d), 0
        self._leaves: list = []
        self._leaf = hashlib.sha256()

    def update(self, mask: np.ndarray) -> "MaskDigest":
        if self._seen % 8:
            raise ValueError("only the last piece of a mask may have a length that is not a multiple of 8")
        if self._seen + len(mask) > self.d:
            raise ValueError(f"mask pieces add up to more than d = {self.d} positions")
        mask = np.asarray(mask, dtype=bool)
        while len(mask):
            take = min(len(mask), DIGEST_CHUNK - self._seen % DIGEST_CHUNK)
            self._leaf.update(np.packbits(mask[:take], bitorder="little").tobytes())
            self._seen += take
            mask = mask[take:]
            if self._seen % DIGEST_CHUNK == 0:
                self._leaves.append(self._leaf.digest())
                self._leaf = hashlib.sha256()
        return self

    def hexdigest(self) -> str:
        if self._seen != self.d:
            raise ValueError(f"digest of {self._seen} positions, expected d = {self.d}")
        leaves = self._leaves + ([self._leaf.digest()] if self._seen % DIGEST_CHUNK else [])
        return combine_digests(self.d, leaves)


def chunk_digests(mask: np.ndarray, start: int) -> list:
    """The leaf digests (bytes) of the chunks a mask slice starting at `start` covers; `start` must be a
    multiple of DIGEST_CHUNK and the slice end at a chunk boundary or at d."""
    if start % DIGEST_CHUNK:
        raise ValueError(f"a shard's digests start at a multiple of {DIGEST_CHUNK}, got {start}")
    mask = np.asarray(mask, dtype=bool)
    return [hashlib.sha256(np.packbits(mask[lo:lo + DIGEST_CHUNK], bitorder="little").tobytes()).digest()
            for lo in range(0, len(mask), DIGEST_CHUNK)]


def combine_digests(d: int, leaves) -> str:
    """The mask digest from its leaf digests in order (ceil(d / DIGEST_CHUNK) of them)."""
    if len(leaves) != -(-int(d) // DIGEST_CHUNK):
        raise ValueError(f"{len(leaves)} leaf digests for d = {d}, expected {-(-int(d) // DIGEST_CHUNK)}")
    outer = hashlib.sha256(b"deltamask/mask/v2" + int(d).to_bytes(8, "little"))
    for leaf in leaves:
        outer.update(leaf)
    return outer.hexdigest()


def mask_digest(mask: np.ndarray) -> str:
    """Hex SHA-256 of a whole bool mask (see `MaskDigest`)."""
    return MaskDigest(len(mask)).update(mask).hexdigest()


def reference_mask(thresholds: np.ndarray, round_seed: int, client_id: str, mode: str = PER_CLIENT,
                   start: int = 0, stop: Optional[int] = None) -> np.ndarray:
    """The reference mask (or the slice start:stop of it) a client draws from the global thresholds."""
    stop = len(thresholds) if stop is None else stop
    return sample_mask(thresholds[start:stop], reference_seed(round_seed, client_id, mode), start)


def _check_seed(seed: int) -> int:
    seed = int(seed)
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"seeds are unsigned 64-bit integers, got {seed}")
    return seed
