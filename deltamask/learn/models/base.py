"""What a backbone is to the rest of the library: a frozen prefix, the last blocks to mask, a feature size.

Every backbone in the registry is split the same way, so that the prefix's outputs can be computed once
per local dataset (`deltamask.learn.prefix_cache`) and local training runs only the masked part:

    inputs --prefix--> hidden --masked--> features (B, feature_dim) --head--> logits

`masked` holds the last `blocks` blocks and whatever pooling follows them; `deltamask.learn.masking` puts
masks over its Linear and Conv weights. Both parts are in eval mode and frozen.
"""
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch
from torch import nn


@dataclass
class Preprocessing:
    """How raw inputs must look for a backbone."""

    kind: str = "image"  # "image" or "text"
    size: int = 224  # square input side, in pixels (images)
    channels: int = 3
    mean: Tuple[float, ...] = (0.485, 0.456, 0.406)
    std: Tuple[float, ...] = (0.229, 0.224, 0.225)
    max_length: int = 128  # tokens (text)


@dataclass
class Backbone:
    name: str
    prefix: nn.Module  # frozen blocks before the masked ones: inputs -> hidden
    masked: nn.Module  # the last `blocks` blocks + pooling: hidden -> (B, feature_dim)
    feature_dim: int
    blocks: int  # how many blocks `masked` holds
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    weights: Optional[str] = None  # where the pretrained weights came from; None = random init
    tokenizer: Optional[object] = None  # text backbones: a callable list[str] -> dict of tensors

    def __post_init__(self) -> None:
        for part in (self.prefix, self.masked):
            part.eval()
            for p in part.parameters():
                p.requires_grad_(False)

    def features(self, inputs) -> torch.Tensor:
        """The frozen backbone end to end, unmasked: inputs -> (B, feature_dim)."""
        return self.masked(self.prefix(inputs))
