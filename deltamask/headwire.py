"""The head phase on the wire: a linear head, and FiT-LDA statistics.

A linear head: little-endian float32, the weight (classes x features, row-major),
then the bias. 4 * (C * F + C) bytes; the shape comes with the task.

With `local.loss: virtual_classes` both directions carry one more block after those bytes, about the masked
blocks' inputs (the frozen prefix's outputs, P numbers an example):
  up, after a device's LDA statistics: b"DMIN", u32 P, then its per-class sums float32 (C x P);
  down, after the head: b"DMCA", u32 P, C bytes (1 where some device holds the class), then the federation's
  per-class means float32 (C x P; zeros where no device holds the class).
A head that carries them decodes to (weight, bias, anchors), the anchors' rows NaN where no device holds the
class; without them to (weight, bias)."""
import struct
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from deltamask.errors import PayloadError


# What a device may upload, at most: a linear head's |value| (a probe over backbone features stays far
# below), an LDA class mean's |value|, and examples in one device's statistics. Beyond: refused.
MAX_HEAD_ABS = 1e4
MAX_EXAMPLES = 1e8
# The head goes down inside one Task message, and an agent takes messages of up to 8 MiB
# (edge_client/transport.py): a head with class anchors must leave room for the rest of the task.
MAX_HEAD_MESSAGE = 6 << 20


def head_nbytes(num_classes: int, feature_dim: int) -> int:
    return 4 * (num_classes * feature_dim + num_classes)


_INPUTS, _ANCHORS = b"DMIN", b"DMCA"


def encode_head(weight: np.ndarray, bias: np.ndarray, anchors: Optional[np.ndarray] = None) -> bytes:
    """A head's bytes; with `anchors` (classes x P, NaN rows for classes no device holds) the class anchors
    block after them."""
    weight, bias = np.asarray(weight, dtype="<f4"), np.asarray(bias, dtype="<f4")
    if weight.ndim != 2 or bias.shape != (weight.shape[0],):
        raise ValueError(f"head weight {weight.shape} and bias {bias.shape} do not fit together")
    if anchors is None:
        return weight.tobytes() + bias.tobytes()
    anchors = np.asarray(anchors, dtype=np.float32)
    if anchors.ndim != 2 or len(anchors) != len(bias):
        raise ValueError(f"anchors {anchors.shape} do not fit a head of {len(bias)} classes")
    held = np.isfinite(anchors).all(1)
    block = np.where(held[:, None], anchors, 0).astype("<f4")
    return b"".join((weight.tobytes(), bias.tobytes(), _ANCHORS, struct.pack("<I", anchors.shape[1]),
                     held.astype(np.uint8).tobytes(), block.tobytes()))


def _block(data: bytes, magic: bytes, rows: int, what: str) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """(rows x P float32 after `magic` and P, the rows' flags when `magic` is the anchors'); PayloadError if
    the bytes are not exactly such a block."""
    if len(data) < 8 or data[:4] != magic:
        raise PayloadError(f"{len(data)} bytes after the {what} that are not its class block")
    (width,) = struct.unpack_from("<I", data, 4)
    flags = rows if magic == _ANCHORS else 0
    if width == 0 or len(data) != 8 + flags + 4 * rows * width:
        raise PayloadError(f"class block of {len(data)} bytes for {rows} classes x {width} inputs")
    raw = np.frombuffer(data, np.uint8, flags, 8) if flags else None
    values = np.frombuffer(data, "<f4", rows * width, 8 + flags).reshape(rows, width)
    if not np.isfinite(values).all():
        raise PayloadError(f"the {what}'s class block holds NaN or infinite values")
    if raw is None:
        return values, None
    if raw.max(initial=0) > 1 or values[raw == 0].any():  # one encoding of each head: flags 0/1, zeros where 0
        raise PayloadError(f"the {what}'s class block is not in its one encoding (flags 0 or 1, zero rows unheld)")
    return values, raw.astype(bool)


def decode_head(data: bytes, num_classes: int, feature_dim: int, limit: Optional[float] = None) -> Tuple:
    """(weight, bias) as float32, or (weight, bias, anchors) when the head carries class anchors;
    PayloadError for a wrong length, a non-finite value, or (with `limit`, for a head a device uploads) a
    value beyond +-limit."""
    expected = head_nbytes(num_classes, feature_dim)
    if len(data) < expected or (len(data) > expected and limit is not None):
        raise PayloadError(f"head of {len(data)} bytes; {num_classes} classes x {feature_dim} features "
                           f"need {expected}")
    anchors = None
    if len(data) > expected:
        block, held = _block(data[expected:], _ANCHORS, num_classes, "head")
        anchors = np.where(held[:, None], block, np.nan).astype(np.float32)
        data = data[:expected]
    values = np.frombuffer(data, dtype="<f4").astype(np.float32)
    if not np.isfinite(values).all():
        raise PayloadError("head holds NaN or infinite values")
    if limit is not None and np.abs(values).max(initial=0.0) > limit:
        raise PayloadError(f"head values beyond +-{limit:g}: not a head a device trained")
    split = num_classes * feature_dim
    head = values[:split].reshape(num_classes, feature_dim), values[split:]
    return head if anchors is None else head + (anchors,)


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
    inputs: Optional[np.ndarray] = None  # virtual_classes: per-class sums of the masked blocks' inputs (classes, P)


def lda_width(feature_dim: int, covariance: str, rank: int) -> int:
    """k: the size of the vectors the statistics are over (a projection to at most the feature size)."""
    return min(rank, feature_dim) if covariance == "projected" else feature_dim


def lda_stats_nbytes(num_classes: int, feature_dim: int, covariance: str, rank: int = 0) -> int:
    """Bytes of a device's LDA statistics, without a class block (`class_block_nbytes`)."""
    k = lda_width(feature_dim, covariance, rank)
    second = 4 * k if covariance == "diag" else 2 * (k * (k + 1) // 2)
    return 4 * (num_classes * k + num_classes) + second


def class_block_nbytes(num_classes: int, input_dim: int, anchors: bool = False) -> int:
    """Bytes of the class block after LDA statistics (sums) or after a head (`anchors`: flags and means)."""
    return 8 + (num_classes if anchors else 0) + 4 * num_classes * input_dim


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
    out = sums.tobytes() + counts.astype("<u4").tobytes() + tail.tobytes()
    if stats.inputs is None:
        return out
    inputs = np.asarray(stats.inputs, dtype="<f4")
    return b"".join((out, _INPUTS, struct.pack("<I", inputs.shape[1]), inputs.tobytes()))


def decode_lda_stats(data: bytes, num_classes: int, feature_dim: int, covariance: str, rank: int = 0,
                     input_dim: int = 0) -> LdaStats:
    """LdaStats (float64 arrays, second moments as sums); PayloadError for a wrong length, a non-finite
    value or no examples. With `input_dim` (virtual_classes) the statistics must carry the per-class sums of
    that many masked blocks' inputs, without it none."""
    if covariance not in LDA_COVARIANCES:
        raise ValueError(f"covariance must be one of {LDA_COVARIANCES}, got {covariance!r}")
    expected = lda_stats_nbytes(num_classes, feature_dim, covariance, rank)
    inputs = None
    if input_dim:
        if len(data) <= expected:
            raise PayloadError("LDA statistics without the class sums of the inputs that virtual_classes needs")
        block, _ = _block(data[expected:], _INPUTS, num_classes, "LDA statistics")
        if block.shape[1] != input_dim:
            raise PayloadError(f"class sums of {block.shape[1]} inputs; the masked blocks take {input_dim}")
        inputs, data = block.astype(np.float64), data[:expected]
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
    if inputs is not None and np.abs(inputs / np.maximum(counts, 1)[:, None]).max(initial=0.0) > MAX_HEAD_ABS:
        raise PayloadError(f"class means of the inputs beyond +-{MAX_HEAD_ABS:g}: not the prefix's outputs")
    empty = counts == 0  # sums for a class of no examples would move the federation's means at no weight
    if sums[empty].any() or (inputs is not None and inputs[empty].any()):
        raise PayloadError("LDA statistics with sums for a class of no examples")
    if covariance == "diag":
        return LdaStats(sums, counts, rest, inputs)
    second = np.zeros((k, k))
    second[np.triu_indices(k)] = rest
    second = (second + np.triu(second, 1).T) * counts.sum()
    return LdaStats(sums, counts, second, inputs)
