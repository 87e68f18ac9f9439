"""Bayesian aggregation of client masks: integer Beta counts, the prior reset, theta.

alpha = lambda0 + (ones seen at a position), beta = lambda0 + (masks seen) - (ones seen). Masks are
added one at a time (or slice by slice), so K x d is never held in memory.
"""
import math
from typing import Optional

import numpy as np

from deltamask.sampling import theta_to_thresholds

MODE, MEAN = "mode", "mean"


class BetaCounts:
    """The global mask's Beta posterior, as counts since the last reset."""

    def __init__(self, d: int, lambda0: float = 1.0, dtype=np.uint32) -> None:
        if lambda0 <= 0:
            raise ValueError(f"lambda0 must be positive, got {lambda0}")
        self.d, self.lambda0 = int(d), float(lambda0)
        self.ones = np.zeros(self.d, dtype=dtype)  # masks with a 1 at each position
        self.masks = 0  # masks added since the last reset

    def reset(self) -> None:
        """Back to the prior alpha = beta = lambda0."""
        self.ones[:] = 0
        self.masks = 0

    def add(self, mask: np.ndarray) -> None:
        """Add one whole client mask (bool, length d)."""
        if len(mask) != self.d:
            raise ValueError(f"mask has {len(mask)} positions, expected d = {self.d}")
        self.add_slice(mask, 0)
        self.masks += 1

    def add_packed(self, packed: np.ndarray, chunk: int = 1 << 20) -> None:
        """Add one whole client mask packed 8 positions a byte, least significant bit first."""
        if len(packed) != (self.d + 7) // 8:
            raise ValueError(f"packed mask has {len(packed)} bytes, expected {(self.d + 7) // 8}")
        for lo in range(0, self.d, chunk):
            hi = min(lo + chunk, self.d)  # chunk is a multiple of 8
            bits = np.unpackbits(packed[lo // 8:(hi + 7) // 8], bitorder="little")[: hi - lo]
            self.add_slice(bits, lo)
        self.masks += 1

    def add_slice(self, ones: np.ndarray, start: int) -> None:
        """Add per-position counts of ones over start .. start + len(ones) - 1. The caller then counts
        the masks those ones came from with `count_masks` (used by sharded aggregation)."""
        self.ones[start:start + len(ones)] += ones.astype(self.ones.dtype, copy=False)

    def count_masks(self, k: int) -> None:
        self.masks += int(k)

    def theta(self, formula: str = MODE, previous: Optional[np.ndarray] = None) -> np.ndarray:
        """theta as float64 (see `theta_from_counts`)."""
        return theta_from_counts(self.ones, self.masks, self.lambda0, formula, previous)

    def thresholds(self, formula: str = MODE, previous: Optional[np.ndarray] = None) -> np.ndarray:
        """theta as wire thresholds (uint32), equal to `theta_to_thresholds(self.theta(...))` element for
        element, computed without a float vector of length d: theta depends only on the integer count at
        a position, so it is taken once per count value (0 .. masks) and looked up. `previous` holds the
        previous thresholds, kept where the mode is undefined."""
        denominator = 2 * self.lambda0 - 2 + self.masks
        if formula == MODE and denominator <= 0:
            if previous is None:
                raise ValueError("the mode is undefined with no masks and lambda0 <= 1; pass previous")
            return np.asarray(previous, dtype=np.uint32)
        table = theta_to_thresholds(theta_from_counts(np.arange(self.masks + 1), self.masks, self.lambda0, formula))
        return table[self.ones]


def theta_from_counts(ones: np.ndarray, masks: int, lambda0: float = 1.0, formula: str = MODE,
                      previous: Optional[np.ndarray] = None) -> np.ndarray:
    """theta from Beta counts: the mode (alpha-1)/(alpha+beta-2) of Eq. 3 (default) or Algorithm 2's
    mean alpha/(alpha+beta), clipped to [0, 1].

    Why the mode: with the prior reset every round, the mean stays inside [1/(K+2), (K+1)/(K+2)], so no
    position can ever become decided, and training collapsed in our runs (docs/design.md section 3.3); with
    lambda0 = 1 the mode is the fraction of clients with a 1. Where the mode is undefined (no mask since
    the reset and lambda0 = 1), theta stays `previous`.
    """
    ones = np.asarray(ones, dtype=np.float64)
    if formula == MODE:
        denominator = 2 * lambda0 - 2 + masks
        if denominator <= 0:
            if previous is None:
                raise ValueError("the mode is undefined with no masks and lambda0 <= 1; pass previous")
            return np.asarray(previous, dtype=np.float64)
        theta = (ones + (lambda0 - 1)) / denominator
    elif formula == MEAN:
        theta = (ones + lambda0) / (2 * lambda0 + masks)
    else:
        raise ValueError(f"unknown theta formula {formula!r}; expected {MODE!r} or {MEAN!r}")
    return np.clip(theta, 0.0, 1.0)


def reset_period(rho: float) -> int:
    """Rounds between prior resets: ceil(1/rho) (rho = the participation rate, 0 < rho <= 1)."""
    if not 0 < rho <= 1:
        raise ValueError(f"participation rate rho must lie in (0, 1], got {rho}")
    return max(1, math.ceil(1.0 / rho - 1e-9))  # 1/(1/3) is 3.0000000000000004 in floating point


def reset_due(round_index: int, rho: float) -> bool:
    """Whether the prior is reset before aggregating round `round_index` (0-based)."""
    return round_index % reset_period(rho) == 0

