"""From uint8 image arrays to a backbone's normalised float input tensors, in memory-bounded batches.

torch is imported when a function runs, so that `deltamask.data` loads and partitions without it.
"""
from typing import TYPE_CHECKING, Iterator, Sequence, Tuple

import numpy as np

from deltamask.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, for colour -> one channel


def _check(images: np.ndarray, size: int, channels: int, mean: Sequence[float],
           std: Sequence[float]) -> Tuple[np.ndarray, np.ndarray]:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise DataError(f"images must be a uint8 NumPy array, got {getattr(images, 'dtype', type(images))}")
    if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] in (1, 3))):
        raise DataError(f"images must be (N, H, W), (N, H, W, 1) or (N, H, W, 3), got shape {images.shape}")
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels}")
    if size < 1:
        raise DataError(f"size must be positive, got {size}")
    mean_a, std_a = np.asarray(mean, np.float32).ravel(), np.asarray(std, np.float32).ravel()
    if len(mean_a) not in (1, channels) or len(std_a) not in (1, channels) or not np.all(std_a > 0):
        raise DataError(f"mean and std need 1 or {channels} values, std positive; got {mean!r}, {std!r}")
    return np.broadcast_to(mean_a, (channels,)), np.broadcast_to(std_a, (channels,))


def iter_prepared(images: np.ndarray, batch: int = 512, size: int = 224, channels: int = 3,
                  mean: Sequence[float] = IMAGENET_MEAN,
                  std: Sequence[float] = IMAGENET_STD) -> Iterator["torch.Tensor"]:
    """Yield float32 (B, channels, size, size) tensors, `batch` images at a time, in order.

    Each image is scaled to [0, 1], given `channels` channels (grayscale repeated to 3; colour to 1 by
    BT.601 luma), resized to size x size (bilinear, antialiased, align_corners=False; non-square images are
    stretched) and normalised as (x - mean) / std per channel.
    """
    import torch
    import torch.nn.functional as F

    mean_a, std_a = _check(images, size, channels, mean, std)
    if batch < 1:
        raise DataError(f"batch must be positive, got {batch}")
    mean_t = torch.from_numpy(mean_a.copy()).view(1, channels, 1, 1)
    std_t = torch.from_numpy(std_a.copy()).view(1, channels, 1, 1)
    luma = torch.tensor(_LUMA).view(1, 3, 1, 1)
    for lo in range(0, len(images), batch):
        x = torch.from_numpy(np.ascontiguousarray(images[lo:lo + batch])).float().div_(255.0)
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # -> (B, C, H, W)
        if x.shape[1] == 3 and channels == 1:
            x = (x * luma).sum(1, keepdim=True)
        if x.shape[-2:] != (size, size):  # resize one channel before repeating it: linear, so the same result
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        yield (x.expand(-1, channels, -1, -1) - mean_t) / std_t


def prepare_images(images: np.ndarray, size: int = 224, channels: int = 3, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD, batch: int = 512) -> "torch.Tensor":
    """All of `images` as one float32 (N, channels, size, size) tensor (see `iter_prepared`).

    Works through `batch` images at a time into one preallocated tensor, so the peak beyond the result is
    one batch. The result itself is N * channels * size^2 * 4 bytes (60,000 at 3x64x64: 2.9 GB); use
    `iter_prepared` to stream instead.
    """
    import torch

    _check(images, size, channels, mean, std)
    out = torch.empty((len(images), channels, size, size), dtype=torch.float32)
    lo = 0
    for x in iter_prepared(images, batch, size, channels, mean, std):
        out[lo:lo + len(x)] = x
        lo += len(x)
    return out
