"""The classifier head on the wire: little-endian float32, the weight (classes x features, row-major),
then the bias. 4 * (C * F + C) bytes; nothing else, the shape comes with the task."""
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
