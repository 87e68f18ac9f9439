"""deltamask: federated fine-tuning by probabilistic masks with ultra-low-bitrate updates (DeltaMask).

The core library: seeded sampling, delta sets, update codecs, Bayesian aggregation and bit accounting.
It does no I/O, networking or process management, and imports without torch.
"""
from deltamask.aggregation import BetaCounts, reset_due, reset_period, theta_from_counts
from deltamask.bits import bits_per_position, bpp, exact_floor_bits, filter_floor_bits, payload_bits
from deltamask.codecs import CODECS, Codec, decode, get_codec
from deltamask.delta import bernoulli_kl, cosine_kappa, delta_positions, top_kappa
from deltamask.errors import DeltaMaskError, PayloadError
from deltamask.rounds import Upload, client_update, rebuild_client_mask
from deltamask.sampling import (PER_CLIENT, SHARED, MaskDigest, client_seed, mask_digest, reference_seed,
                                sample_mask, theta_to_thresholds, thresholds_to_theta, uniforms)
from deltamask.thetawire import decode_theta, encode_theta, theta_digest

__version__ = "0.1.0"

__all__ = [
    "BetaCounts", "CODECS", "Codec", "DeltaMaskError", "MaskDigest", "PER_CLIENT", "PayloadError", "SHARED",
    "Upload", "bernoulli_kl", "bits_per_position", "bpp", "client_seed", "client_update", "cosine_kappa",
    "decode", "decode_theta", "delta_positions", "encode_theta", "exact_floor_bits", "filter_floor_bits",
    "get_codec", "mask_digest", "payload_bits", "rebuild_client_mask", "reference_seed", "reset_due",
    "reset_period", "sample_mask", "theta_digest", "theta_from_counts", "theta_to_thresholds",
    "thresholds_to_theta", "top_kappa", "uniforms",
]
