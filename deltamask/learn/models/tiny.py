"""A very small CNN for fast tests: six conv blocks (3x3 conv, BatchNorm, ReLU), average pool, 32 features.

Its weights come from a seed (weights=None or "default") or a state_dict file saved from `tiny_model()`;
masking the last 5 blocks covers d = 6,768 weights.
"""
from typing import Tuple

import torch
from torch import nn

from deltamask.learn.models import Weights, _check_blocks, _FrozenSequential, _weight_file
from deltamask.learn.models.base import Backbone, Preprocessing

WIDTHS: Tuple[int, ...] = (4, 4, 8, 8, 16, 32)
STRIDES: Tuple[int, ...] = (1, 2, 1, 2, 1, 2)  # 28x28 -> 4x4


def tiny_model(channels: int = 1, seed: int = 0) -> nn.Sequential:
    """The whole network: blocks 0..5, then pooling to (B, 32). Same seed, same weights (same torch)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers, c_in = [], channels
        for width, stride in zip(WIDTHS, STRIDES):
            layers.append(nn.Sequential(nn.Conv2d(c_in, width, 3, stride, padding=1, bias=False),
                                        nn.BatchNorm2d(width), nn.ReLU()))
            c_in = width
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(1))


def load(name: str, weights: Weights = "default", blocks: int = 5, size: int = 28, channels: int = 1,
         seed: int = 0) -> Backbone:
    """prefix = blocks[:6-blocks]; masked = blocks[6-blocks:] + average pool (32)."""
    _check_blocks(name, blocks, len(WIDTHS))
    path = _weight_file(name, weights)
    model = tiny_model(channels, seed)
    if path is not None:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    cut = len(WIDTHS) - blocks
    prefix, masked = _FrozenSequential(*model[:cut]), _FrozenSequential(*model[cut:])
    prep = Preprocessing(size=size, channels=channels, mean=(0.5,) * channels, std=(0.5,) * channels)
    return Backbone(name, prefix, masked, feature_dim=WIDTHS[-1], blocks=blocks, preprocessing=prep,
                    weights=str(path) if path is not None else None)
