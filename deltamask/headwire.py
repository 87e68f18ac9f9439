"""The head phase on the wire: a linear head, and FiT-LDA statistics.

A linear head: little-endian float32, the weight (classes x features, row-major),
then the bias. 4 * (C * F + C) bytes; nothing else, the shape comes with the task."""
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from deltamask.errors import PayloadError


# What a device may upload, at most: a linear head's |value| (a probe over backbone features stays far
# below), an LDA class mean's |value|, and examples in one device's statistics. Beyond: refused.
MAX_HEAD_ABS = 1e4
MAX_EXAMPLES = 1e8


def head_nbytes(num_classes: int, feature_dim: int) -> int:
    return 4 * (num_classes * feature_dim + num_classes)


def encode_head(weight: np.ndarray, bias: np.ndarray) -> bytes:
    weight, bias = np.asarray(weight, dtype="<f4"), np.asarray(bias, dtype="<f4")
    if weight.ndim != 2 or bias.shape != (weight.shape[0],):
        raise ValueError(f"head weight {weight.shape} and bias {bias.shape} do not fit together")
    return weight.tobytes() + bias.tobytes()


def decode_head(data: bytes, num_classes: int, feature_dim: int,
                limit: Optional[float] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(weight, bias) as float32; PayloadError for a wrong length, a non-finite value, or (with `limit`, for
    a head a device uploads) a value beyond +-limit."""
    expected = head_nbytes(num_classes, feature_dim)
    if len(data) != expected:
        raise PayloadError(f"head of {len(data)} bytes; {num_classes} classes x {feature_dim} features "
                           f"need {expected}")
    values = np.frombuffer(data, dtype="<f4").astype(np.float32)
    if not np.isfinite(values).all():
        raise PayloadError("head holds NaN or infinite values")
    if limit is not None and np.abs(values).max(initial=0.0) > limit:
        raise PayloadError(f"head values beyond +-{limit:g}: not a head a device trained")
    split = num_classes * feature_dim
    return values[:split].reshape(num_classes, feature_dim), values[split:]


# --- FiT-LDA statistics: a device's head-round reply when the head is LDA --------------------------------
# Little-endian: per-class sums float32 (classes x k, row-major), per-class counts uint32 (classes), then
# the second moments: "diag" the per-feature sums of squares, float32 (k); "full" and "projected" the upper
# triangle, row by row, of the MEAN second moment sum x x' / n, float16 (k (k + 1) / 2; the mean keeps
# float16 in range, the counts give n back). k is the feature size, or for "projected" the rank r of the
# seeded projection x -> P'x every party draws (deltamask.federation.lda_projection).
LDA_COVARIANCES = ("diag", "full", "projected")


@dataclass(frozen=True)
class LdaStats:
    sums: np.ndarray  # (classes, k)
    counts: np.ndarray  # (classes,)
    second: np.ndarray  # sum of x x': (k,) its diagonal for "diag", else (k, k)


def lda_width(feature_dim: int, covariance: str, rank: int) -> int:
    """k: the size of the vectors the statistics are over (a projection to at most the feature size)."""
    return min(rank, feature_dim) if covariance == "projected" else feature_dim


def lda_stats_nbytes(num_classes: int, feature_dim: int, covariance: str, rank: int = 0) -> int:
    k = lda_width(feature_dim, covariance, rank)
    second = 4 * k if covariance == "diag" else 2 * (k * (k + 1) // 2)
    return 4 * (num_classes * k + num_classes) + second


def encode_lda_stats(stats: LdaStats, covariance: str) -> bytes:
    sums, counts = np.asarray(stats.sums, dtype="<f4"), np.asarray(stats.counts)
    second = np.asarray(stats.second, dtype=np.float64)
    if covariance == "diag":
        tail = (np.diagonal(second) if second.ndim == 2 else second).astype("<f4")
    else:
        mean = second / max(1.0, float(counts.sum()))
        tail = mean[np.triu_indices(len(mean))].astype("<f2")
        if not np.isfinite(tail).all():
            raise ValueError("mean second moments beyond float16's range: scale the features")
    return sums.tobytes() + counts.astype("<u4").tobytes() + tail.tobytes()


def decode_lda_stats(data: bytes, num_classes: int, feature_dim: int, covariance: str, rank: int = 0) -> LdaStats:
    """LdaStats (float64 arrays, second moments as sums); PayloadError for a wrong length, a non-finite
    value or no examples."""
    if covariance not in LDA_COVARIANCES:
        raise ValueError(f"covariance must be one of {LDA_COVARIANCES}, got {covariance!r}")
    expected = lda_stats_nbytes(num_classes, feature_dim, covariance, rank)
    if len(data) != expected:
        raise PayloadError(f"LDA statistics of {len(data)} bytes; {num_classes} classes x {feature_dim} features "
                           f"({covariance}, rank {rank}) need {expected}")
    k = lda_width(feature_dim, covariance, rank)
    split = num_classes * k
    sums = np.frombuffer(data, "<f4", split).astype(np.float64).reshape(num_classes, k)
    counts = np.frombuffer(data, "<u4", num_classes, 4 * split).astype(np.float64)
    rest = np.frombuffer(data, "<f4" if covariance == "diag" else "<f2", offset=4 * (split + num_classes))
    rest = rest.astype(np.float64)
    if not (np.isfinite(sums).all() and np.isfinite(rest).all()):
        raise PayloadError("LDA statistics hold NaN or infinite values")
    if counts.sum() <= 0:
        raise PayloadError("LDA statistics of no examples")
    if counts.sum() > MAX_EXAMPLES:
        raise PayloadError(f"LDA statistics of {counts.sum():.0f} examples: more than {MAX_EXAMPLES:g} from one device")
    if np.abs(sums / np.maximum(counts, 1)[:, None]).max(initial=0.0) > MAX_HEAD_ABS:
        raise PayloadError(f"LDA class means beyond +-{MAX_HEAD_ABS:g}: not statistics of backbone features")
    if covariance == "diag":
        return LdaStats(sums, counts, rest)
    second = np.zeros((k, k))
    second[np.triu_indices(k)] = rest
    second = (second + np.triu(second, 1).T) * counts.sum()
    return LdaStats(sums, counts, second)
