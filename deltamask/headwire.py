"""The head phase on the wire: a linear head, and FiT-LDA statistics.

A linear head: little-endian float32, the weight (classes x features, row-major),
then the bias. 4 * (C * F + C) bytes; nothing else, the shape comes with the task."""
from dataclasses import dataclass
from typing import Tuple

import numpy as np

from deltamask.errors import PayloadError


def head_nbytes(num_classes: int, feature_dim: int) -> int:
    return 4 * (num_classes * feature_dim + num_classes)


def encode_head(weight: np.ndarray, bias: np.ndarray) -> bytes:
    weight, bias = np.asarray(weight, dtype="<f4"), np.asarray(bias, dtype="<f4")
    if weight.ndim != 2 or bias.shape != (weight.shape[0],):
        raise ValueError(f"head weight {weight.shape} and bias {bias.shape} do not fit together")
    return weight.tobytes() + bias.tobytes()


def decode_head(data: bytes, num_classes: int, feature_dim: int) -> Tuple[np.ndarray, np.ndarray]:
    """(weight, bias) as float32; PayloadError for a wrong length or a non-finite value."""
    expected = head_nbytes(num_classes, feature_dim)
    if len(data) != expected:
        raise PayloadError(f"head of {len(data)} bytes; {num_classes} classes x {feature_dim} features "
                           f"need {expected}")
    values = np.frombuffer(data, dtype="<f4").astype(np.float32)
    if not np.isfinite(values).all():
        raise PayloadError("head holds NaN or infinite values")
    split = num_classes * feature_dim
    return values[:split].reshape(num_classes, feature_dim), values[split:]


# --- FiT-LDA statistics: a device's head-round reply when the head is LDA --------------------------------
# Little-endian: per-class feature sums float32 (classes x features, row-major), per-class counts uint32
# (classes), then the second moments float32: "diag" the per-feature sums of squares (features), "full"
# the upper triangle of sum x x' row by row (features * (features + 1) / 2).
LDA_COVARIANCES = ("diag", "full")


@dataclass(frozen=True)
class LdaStats:
    sums: np.ndarray  # (classes, features)
    counts: np.ndarray  # (classes,)
    second: np.ndarray  # (features,) for diag, (features, features) for full


def lda_stats_nbytes(num_classes: int, feature_dim: int, covariance: str) -> int:
    second = feature_dim if covariance == "diag" else feature_dim * (feature_dim + 1) // 2
    return 4 * (num_classes * feature_dim + num_classes + second)


def encode_lda_stats(stats: LdaStats, covariance: str) -> bytes:
    sums = np.asarray(stats.sums, dtype="<f4")
    second = np.asarray(stats.second, dtype=np.float64)
    if covariance == "full":
        second = second[np.triu_indices(len(second))] if second.ndim == 2 else second
    elif second.ndim == 2:
        second = np.diagonal(second)
    return sums.tobytes() + np.asarray(stats.counts, dtype="<u4").tobytes() + second.astype("<f4").tobytes()


def decode_lda_stats(data: bytes, num_classes: int, feature_dim: int, covariance: str) -> LdaStats:
    """LdaStats (float64 arrays); PayloadError for a wrong length or a non-finite value."""
    if covariance not in LDA_COVARIANCES:
        raise ValueError(f"covariance must be one of {LDA_COVARIANCES}, got {covariance!r}")
    expected = lda_stats_nbytes(num_classes, feature_dim, covariance)
    if len(data) != expected:
        raise PayloadError(f"LDA statistics of {len(data)} bytes; {num_classes} classes x {feature_dim} features "
                           f"({covariance}) need {expected}")
    split = num_classes * feature_dim
    sums = np.frombuffer(data, "<f4", split).astype(np.float64).reshape(num_classes, feature_dim)
    counts = np.frombuffer(data, "<u4", num_classes, 4 * split).astype(np.float64)
    rest = np.frombuffer(data, "<f4", offset=4 * (split + num_classes)).astype(np.float64)
    if not (np.isfinite(sums).all() and np.isfinite(rest).all()):
        raise PayloadError("LDA statistics hold NaN or infinite values")
    if covariance == "full":
        second = np.zeros((feature_dim, feature_dim))
        second[np.triu_indices(feature_dim)] = rest
        second = second + np.triu(second, 1).T
    else:
        second = rest
    return LdaStats(sums, counts, second)
