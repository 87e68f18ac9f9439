"""The delta set between a reference mask and a client mask, its KL ranking, and the kappa schedule."""
import math

import numpy as np

EPS = 1e-6  # theta is clipped to [EPS, 1 - EPS] before any logarithm


def delta_positions(reference: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Sorted int64 positions where two bool masks differ."""
    reference, mask = np.asarray(reference, dtype=bool), np.asarray(mask, dtype=bool)
    if reference.shape != mask.shape:
        raise ValueError(f"masks differ in shape: {reference.shape} vs {mask.shape}")
    return np.flatnonzero(reference != mask)


def bernoulli_kl(p: np.ndarray, q: np.ndarray, eps: float = EPS) -> np.ndarray:
    """KL(Bern(p) || Bern(q)) per position, in nats, with p and q clipped to [eps, 1 - eps]."""
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
    q = np.clip(np.asarray(q, dtype=np.float64), eps, 1 - eps)
    return p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))


def top_kappa(positions: np.ndarray, scores: np.ndarray, kappa: float) -> np.ndarray:
    """The ceil(kappa * n) positions with the highest scores, returned sorted by position.

    Ties are broken towards the lower position, so the result is deterministic.
    """
    if not 0.0 <= kappa <= 1.0:
        raise ValueError(f"kappa must lie in [0, 1], got {kappa}")
    positions, scores = np.asarray(positions), np.asarray(scores)
    if positions.shape != scores.shape:
        raise ValueError(f"{len(positions)} positions but {len(scores)} scores")
    keep = math.ceil(kappa * len(positions) - 1e-9)
    if keep >= len(positions):
        return np.sort(positions)
    order = np.argsort(-scores, kind="stable")[:keep]
    return np.sort(positions[order])


def cosine_kappa(round_index: int, rounds: int, start: float = 0.8, end: float = 1.0) -> float:
    """kappa for a round (0-based) of `rounds`, moving from `start` to `end` along half a cosine.

    The paper starts at 0.8 and says only "cosine scheduler"; its text (send the essential updates early,
    more detail once deltas get sparse) reads as a rise, so the default ends at 1.0. Pass `end` below
    `start` for a decay.
    """
    if rounds < 1 or not 0 <= round_index:
        raise ValueError(f"round {round_index} of {rounds}: need rounds >= 1 and round >= 0")
    if rounds == 1:
        return float(start)
    progress = min(round_index, rounds - 1) / (rounds - 1)
    return float(end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress)))
