"""One round of DeltaMask as named steps, shared by the simulator, the coordinator and the edge client.

    client:  reference mask -> own sample -> delta -> rank (KL) -> top kappa -> encode
    server:  decode -> reference mask -> flip -> (digest check) -> add to counts -> theta

Arrays in, arrays out: no I/O, no clock, no network.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from deltamask.codecs import MASK, Codec, DecodedUpdate
from deltamask.delta import bernoulli_kl, delta_positions, top_kappa
from deltamask.sampling import (PER_CLIENT, MaskDigest, reference_mask, sample_mask, sample_seed,
                                theta_to_thresholds, thresholds_to_theta, uniforms)

REBUILD_CHUNK = 1 << 20  # positions per step of the server-side rebuild (a multiple of 8)
_RANK_SALT = 0x72616E6B  # "rank": the random ranking's draws, apart from the sample's


@dataclass(frozen=True)
class Upload:
    """What a client sends for a round, and what it knows about it."""

    payload: bytes
    reference_digest: str  # hex SHA-256 of the reference mask the client drew
    delta: int  # positions where the client's sample differs from its reference
    kept: int  # positions coded in the payload (all of the delta for the raw mask)


RANKINGS = ("kl", "random")


def client_update(thresholds_g: np.ndarray, theta_k: np.ndarray, round_seed: int, client_id: str,
                  kappa: float, codec: Codec, mode: str = PER_CLIENT, ranking: str = "kl",
                  tau: Optional[float] = None) -> Upload:
    """Turn a client's trained theta_k into its upload for the round (paper Eq. 4, Algorithm 1 l. 6-11).

    `thresholds_g` is the global theta as received (uint32 thresholds), `theta_k` the trained
    probabilities (float, length d). `ranking` orders the delta before the top-kappa cut: "kl" (the
    paper: the Bernoulli KL between theta_k and theta_g at each position) or "random" (a seeded uniform
    order, the ablation). With `tau` the client's mask is theta_k >= tau (FedMask) instead of a sample.
    """
    d = len(thresholds_g)
    if len(theta_k) != d:
        raise ValueError(f"theta_k has {len(theta_k)} positions, the global theta {d}")
    reference = reference_mask(thresholds_g, round_seed, client_id, mode)
    mask = sample_mask(theta_to_thresholds(theta_k), sample_seed(round_seed, client_id)) if tau is None \
        else np.asarray(theta_k) >= tau
    flips = delta_positions(reference, mask)
    if codec.carries == MASK:
        payload, kept = codec.encode(mask, d), len(flips)
    else:
        if ranking == "kl":
            scores = bernoulli_kl(theta_k[flips], thresholds_to_theta(thresholds_g[flips]))
        elif ranking == "random":
            scores = uniforms(sample_seed(round_seed, client_id) ^ _RANK_SALT, 0, len(flips)).astype(np.float64)
        else:
            raise ValueError(f"ranking must be one of {RANKINGS}, got {ranking!r}")
        chosen = top_kappa(flips, scores, kappa)
        payload, kept = codec.encode(chosen, d, thresholds_g), len(chosen)
    return Upload(payload, MaskDigest(d).update(reference).hexdigest(), len(flips), kept)


def rebuild_client_mask(update: DecodedUpdate, thresholds_g: np.ndarray, round_seed: int, client_id: str,
                        mode: str = PER_CLIENT) -> Tuple[np.ndarray, str]:
    """Rebuild a client's mask on the server: its reference mask with the decoded flips applied.

    Returns the mask packed 8 positions a byte (least significant bit first; memory d/8) and the hex
    digest of the reference mask drawn, to compare with the one the client sent before the mask is
    added to the counts. Works in slices of REBUILD_CHUNK positions; each slice is independent.
    """
    d = len(thresholds_g)
    packed = np.empty((d + 7) // 8, dtype=np.uint8)
    digest = MaskDigest(d)
    for lo in range(0, d, REBUILD_CHUNK):
        hi = min(lo + REBUILD_CHUNK, d)
        reference = reference_mask(thresholds_g, round_seed, client_id, mode, lo, hi)
        digest.update(reference)
        packed[lo // 8:(hi + 7) // 8] = np.packbits(update.client_mask(reference, lo), bitorder="little")
    return packed, digest.hexdigest()
